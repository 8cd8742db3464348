"""What glibc allocator settings cost CPU inference: the demo model answering a 32-frame clip (8 tokens, no
reduction) one request after another, under three settings, each in its own process (mallopt cannot be undone),
the processes alternated over rounds so that the machine's drift falls on each alike:

- default: glibc as it comes (what `aim-serve serve` keeps, plus 2 arenas, which cost nothing measurable here);
- mmap-128k: the mmap threshold fixed at 128 KiB (large buffers always mmapped and unmapped);
- trim-each: malloc_trim(0) after every request (what trimming at every idle moment does to sequential callers).

    python bench/allocator.py --model models/tiny-llava-onevision --rounds 3

Prints the median seconds per request of each setting and its ratio to the default (service/allocator.py and
docs/operations.md quote them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "mmap-128k", "trim-each")

CHILD = r"""
import ctypes, json, sys, time
sys.path.insert(0, sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
setting, model, requests = sys.argv[2], sys.argv[3], int(sys.argv[4])
if setting == "mmap-128k":
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
from bench.service_load import sample_video
from aim_engine import AimEngine, GenerationRequest, ReductionPlan, SamplingParams
from aim_engine.request import TextPart, VideoPart
engine = AimEngine.load(model)
request = GenerationRequest([VideoPart(data=sample_video(32), mime_type="video/mp4", num_frames=32),
                             TextPart("What moves?")], SamplingParams(max_new_tokens=8, ignore_eos=True))
times = []
for i in range(requests + 1):  # the first warms up
    start = time.perf_counter()
    engine.generate(request, ReductionPlan())
    times.append(time.perf_counter() - start)
    if setting == "trim-each":
        libc.malloc_trim(0)
print(json.dumps(times[1:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/tiny-llava-onevision"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5, help="timed requests per process")
    args = parser.parse_args()
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), setting, args.model, str(args.requests)],
                                 capture_output=True, text=True, check=True).stdout
            times[setting] += json.loads(out.strip().splitlines()[-1])
    base = statistics.median(times["default"])
    for setting in SETTINGS:
        median = statistics.median(times[setting])
        print(f"{setting:<10} median {median:.3f} s per request ({median / base:.2f}x the default; "
              f"{len(times[setting])} requests)")


if __name__ == "__main__":
    main()
