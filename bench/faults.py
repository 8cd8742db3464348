"""The fault corpus (tests/fault_corpus.py) against `aim-serve serve` in its own process: per case the status it
got, whether the server still answered a good request right after it, and the server's resident memory change
over the case. Writes docs/results/faults.json (a list of {case, status, server_kept_serving, rss_delta_mib}).

    python bench/faults.py                       # tiny random LLaVA-OneVision built in a temporary directory
    python bench/faults.py --rounds 3            # the corpus 3 times; the figures of the last round

The HTTP API's cases (tests/fault_corpus.http_corpus) follow, with status "HTTP <code>". The figures of the last
round are reported: the first round also pays one-time costs (imports, allocator pools,
the tokenizer's caches). The peak line is the server's high-water mark while it serves the 1080p clip of 900
frames, over its resident memory before.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine.tiny import build_llava_onevision  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2 as pb  # noqa: E402
from tests.fault_corpus import (SERVER_FLAGS, corpus, http_corpus, http_server_flags, request, rss_mib,  # noqa: E402
                                send, send_http, text)
from tests.service.test_subprocess import ServerProcess  # noqa: E402


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/faults.json"))
    return parser.parse_args()


def _print_rows(rows: list[dict]) -> None:
    width = max(len(r["case"]) for r in rows)
    for r in rows:
        print(f"{r['case']:<{width}}  {r['status']:<18} kept serving: {r['server_kept_serving']!s:<5} "
              f"rss {r['rss_delta_mib']:+6.1f} MiB")


def main() -> None:
    args = _arguments()
    cases = corpus()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_llava_onevision(Path(tmp) / "tiny-ov", layers=6, image_size=64)
        allowed, outside = Path(tmp) / "allowed", Path(tmp) / "outside"
        allowed.mkdir()
        outside.mkdir()
        http_cases = http_corpus(allowed, outside / "secret.png")
        server = ServerProcess(model, *SERVER_FLAGS, *http_server_flags(allowed))
        pid = server.proc.pid
        good = request(text("Describe it."), tokens=3)
        rows = []
        try:
            with grpc.insecure_channel(server.target,
                                       options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
                generate = channel.unary_unary("/aim.v1.AimService/Generate",
                                               request_serializer=pb.GenerateRequest.SerializeToString,
                                               response_deserializer=pb.GenerateResponse.FromString)
                expected = generate(good, timeout=120).text
                start = rss_mib(pid)
                for round_ in range(args.rounds):
                    rows = []
                    for case in cases:
                        before = rss_mib(pid)
                        if case.name.startswith("video: 1080p clip of 900"):
                            Path(f"/proc/{pid}/clear_refs").write_text("5")
                        code, details = send(channel, case)
                        if case.name.startswith("video: 1080p clip of 900"):
                            peak = rss_mib(pid, "VmHWM") - before
                        kept = server.proc.poll() is None and generate(good, timeout=120).text == expected
                        rows.append({"case": case.name, "status": code.name,
                                     "expected": [c.name for c in case.codes],
                                     "server_kept_serving": kept,
                                     "rss_delta_mib": round(rss_mib(pid) - before, 1),
                                     "message": details[:200]})
                    for case in http_cases:  # the HTTP API's cases: status "HTTP <code>"
                        before = rss_mib(pid)
                        status, details = send_http(server.http_url, case)
                        kept = server.proc.poll() is None and generate(good, timeout=120).text == expected
                        rows.append({"case": case.name, "status": f"HTTP {status}",
                                     "expected": [f"HTTP {case.status}"], "server_kept_serving": kept,
                                     "rss_delta_mib": round(rss_mib(pid) - before, 1), "message": details[:200]})
                    print(f"round {round_ + 1}: resident {rss_mib(pid):.0f} MiB "
                          f"({rss_mib(pid) - start:+.0f} since the first good request)", flush=True)
                end = rss_mib(pid)
        finally:
            server.stop()
    bad = [r for r in rows if r["status"] not in r["expected"] or not r["server_kept_serving"]]
    _print_rows(rows)
    print(f"\n{len(rows)} cases; {len(bad)} with an unexpected status or a server that stopped serving; "
          f"resident memory {start:.0f} -> {end:.0f} MiB over {args.rounds} rounds; the 1080p clip's peak "
          f"+{peak:.0f} MiB")
    out = [{k: r[k] for k in ("case", "status", "server_kept_serving", "rss_delta_mib")} for r in rows]
    Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json_out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
