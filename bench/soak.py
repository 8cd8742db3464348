"""The soak (tests/soak.py) against `aim-serve serve` in its own process, in rounds: per round its requests'
outcomes by wire, whether the server's books balanced after it (nothing in flight or queued, KV in use equal to
what the prefix cache holds, no decoded media held) and the server's resident memory. Writes
docs/results/soak.json.

    python bench/soak.py                          # 6 rounds of 16 callers x 15 requests, tiny LLaVA-OneVision
    python bench/soak.py --rounds 6 --per-caller 30

Each round's callers have their own seeds (different media, plans, cancels and deadlines each round, the
repeated items the same); resident memory is read once the books balance after a round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine.tiny import build_llava_onevision  # noqa: E402
from tests.fault_corpus import rss_mib  # noqa: E402
from tests.service.test_subprocess import ServerProcess  # noqa: E402
from tests.soak import books_balance, run_soak, server_books  # noqa: E402


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--per-caller", type=int, default=15)
    parser.add_argument("--feature-cache-bytes", type=int, default=8 * 1024 * 1024,
                        help="the server's feature cache: small, so that it is full after the first round and the "
                             "resident memory after it shows what else stays")
    parser.add_argument("--prefix-cache-bytes", type=int, default=16 * 1024 * 1024,
                        help="the server's prefix cache, likewise: its entries fill KV-pool pages never touched before "
                             "(resident from then on) until its budget, a quarter of the pool by default")
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/soak.json"))
    return parser.parse_args()


def _balanced(metrics_url: str, timeout: float = 60.0) -> tuple[bool, dict]:
    deadline = time.monotonic() + timeout
    books = server_books(metrics_url)
    while not books_balance(books) and time.monotonic() < deadline:
        time.sleep(0.1)
        books = server_books(metrics_url)
    return books_balance(books), books


def main() -> None:
    args = _arguments()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_llava_onevision(Path(tmp) / "tiny-ov", layers=6, image_size=64)
        server = ServerProcess(model, "--http-port", "0", "--calibrate", "0", "--max-queue", "16",
                               "--feature-cache-bytes", str(args.feature_cache_bytes),
                               "--prefix-cache-bytes", str(args.prefix_cache_bytes))
        try:
            start = rss_mib(server.proc.pid)
            for index in range(args.rounds):
                result = run_soak(server.target, server.http_url, args.callers, args.per_caller, seed=index)
                balanced, books = _balanced(server.metrics_url)
                rounds.append({"round": index + 1, "requests": result.requests, "seconds": round(result.seconds, 1),
                               "outcomes": {f"{w} {o}": n for (w, o), n in sorted(result.outcomes.items())},
                               "failures": result.failures, "books_balanced": balanced, "books": books,
                               "rss_mib": round(rss_mib(server.proc.pid), 1)})
                cached = books.get("feature_cache", 0) / 2**20
                print(f"round {index + 1}: {result.requests} requests in {result.seconds:.0f} s, "
                      f"{len(result.failures)} unexpected, books balanced: {balanced}, resident "
                      f"{rounds[-1]['rss_mib']:.0f} MiB (feature cache {cached:.1f} MiB)", flush=True)
        finally:
            code = server.stop()
    out = {"callers": args.callers, "per_caller": args.per_caller, "feature_cache_bytes": args.feature_cache_bytes,
           "prefix_cache_bytes": args.prefix_cache_bytes, "rss_start_mib": round(start, 1),
           "server_exit_code": code, "rounds": rounds}
    Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json_out}")
    bad = any(r["failures"] or not r["books_balanced"] for r in rounds) or code != 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
