"""Repeated media: five questions about each of 20 clips, on the reference model served by `aim-serve serve`, with
the caches off, the feature cache alone, and the feature cache with prefix reuse; under the untouched model (`none`)
and the model's default AIM plan (merging alone). A fresh server for each (cache, plan). Questions go one at a time
(latency; req/s is the inverse of the mean latency). The answers must not depend on the caches.

    python bench/repeated_media.py [--clips 20] [--model models/aim-reference] [--out docs/results/repeated-media.json]

Writes one row per (cache, plan, question_index): latency_p50_s over the clips and throughput_rps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ("Which shape appears?", "Which way does it move?", "What colour is the new shape?",
             "How many shapes are there?", "Is there a star?")


def clips(count: int) -> list[bytes]:
    from reference_model import synthetic as syn
    from reference_model.samples import encode_mp4

    return [encode_mp4(syn.make_video(0, "test", 20_000 + index).frames) for index in range(count)]


CACHES = {"off": (0, 0), "features": (256 * 2**20, 0), "features+prefix": (256 * 2**20, 256 * 2**20)}


def serve(model: str, cache: str) -> tuple[subprocess.Popen, str]:
    feature_bytes, prefix_bytes = CACHES[cache]
    proc = subprocess.Popen(["aim-serve", "serve", "--model", model, "--port", "0", "--metrics-port", "-1",
                             "--feature-cache-bytes", str(feature_bytes), "--prefix-cache-bytes", str(prefix_bytes)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on ([\d.]+:\d+);", line)
        if match:
            return proc, match[1]
    raise RuntimeError("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--model", default=str(ROOT / "models/aim-reference"))
    ap.add_argument("--out", default=str(ROOT / "docs/results/repeated-media.json"))
    args = ap.parse_args()

    from service.client import AimClient

    videos = clips(args.clips)
    rows, answers = [], {}
    for cache in CACHES:
        for plan in ("none", "aim-default"):
            proc, target = serve(args.model, cache)  # a fresh server: every clip is new to its caches
            try:
                with AimClient(target, timeout=120) as client:
                    kwargs = {"no_reduction": True} if plan == "none" else {"plan": _default_plan(client)}
                    seconds = {i: [] for i in range(len(QUESTIONS))}
                    for c, video in enumerate(videos):
                        for q, question in enumerate(QUESTIONS):
                            start = time.perf_counter()
                            reply = client.generate(question, videos=[video], max_new_tokens=8, **kwargs)
                            seconds[q].append(time.perf_counter() - start)
                            answers.setdefault((plan, c, q), {})[cache] = reply.text
                            if cache != "off":  # the caches do what they say
                                assert reply.usage.feature_cache_hits == int(q > 0), (cache, c, q, reply.usage)
                            if cache == "features+prefix":
                                assert (reply.usage.prefix_tokens_reused > 0) == (q > 0), (c, q, reply.usage)
            finally:
                proc.terminate()
                proc.wait(60)
            for q, values in seconds.items():
                rows.append({"cache": cache, "plan": plan, "question_index": q,
                             "latency_p50_s": round(statistics.median(values), 4),
                             "throughput_rps": round(len(values) / sum(values), 3), "requests": len(values)})
                print(json.dumps(rows[-1]), flush=True)
    differing = [key for key, by_cache in answers.items() if len(set(by_cache.values())) > 1]
    assert not differing, f"answers depend on the cache: {differing[:5]}"
    Path(args.out).write_text(json.dumps({"command": "python bench/repeated_media.py", "clips": args.clips,
                                          "questions_per_clip": len(QUESTIONS), "max_new_tokens": 8,
                                          "rows": rows}, indent=2) + "\n")
    print(args.out)


def _default_plan(client):
    from service.plan_proto import plan_from_proto

    return plan_from_proto(client.model_info().default_plan)


if __name__ == "__main__":
    main()
