"""How long the client commands take to start: each of `aim-serve health|info|estimate|generate|stream` run as a
user runs it (a new process), against a real `aim-serve serve` on loopback. A command's start cost is its wall
time less the time the server reports for the request (generate and stream: the response's total_seconds; the
others do no model work). Medians of --runs runs; the server serves a tiny random model so that model time is small.

    python bench/cli_start.py [--runs 7] [--out docs/results/cli-start.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(["aim-serve", "serve", "--model", str(model), "--port", "0", "--metrics-port", "-1",
                             "--calibrate", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on ([\d.]+:\d+);", line)
        if match:
            return proc, match[1]
    raise RuntimeError("the server did not start")


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def server_seconds(command: str, out: str) -> float:
    """What the server spent on the request, from --json output (0 for commands without model work)."""
    if command == "generate":
        return json.loads(out)["timings"]["total_seconds"]
    if command == "stream":
        return json.loads(out.splitlines()[-1])["result"]["timings"]["total_seconds"]
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "docs/results/cli-start.json"))
    args = ap.parse_args()

    from tests.media_samples import encode_image

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run(["aim-serve", "build-tiny", "--family", "llava_onevision", "--out", str(model)], check=True,
                       capture_output=True)
        image = Path(tmp) / "a.png"
        image.write_bytes(encode_image("PNG"))
        proc, target = start_server(model)
        try:
            request = ["--target", target, "--image", str(image), "--max-new-tokens", "4"]
            commands = {"health": ["--target", target], "info": ["--target", target],
                        "estimate": ["--target", target, "--image", str(image)],
                        "generate": [*request, "--json"], "stream": [*request, "--json"]}
            rows = []
            for command, flags in commands.items():
                timed(["aim-serve", command, *flags])  # warm the file cache
                walls, starts = [], []
                for _ in range(args.runs):
                    wall, out = timed(["aim-serve", command, *flags])
                    walls.append(wall)
                    starts.append(wall - server_seconds(command, out))
                rows.append({"command": command, "runs": args.runs, "wall_median_s": round(statistics.median(walls), 3),
                             "start_median_s": round(statistics.median(starts), 3)})
                print(f"{command:>9}: wall {rows[-1]['wall_median_s']:.3f} s, start (wall less server time) "
                      f"{rows[-1]['start_median_s']:.3f} s")
        finally:
            proc.terminate()
            proc.wait(30)
    Path(args.out).write_text(json.dumps({"command": "python bench/cli_start.py", "cpus": os.cpu_count(),
                                          "rows": rows}, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
