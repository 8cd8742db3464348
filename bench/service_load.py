"""Load generator for continuous batching: throughput, tokens/s, TTFT and latency of real `aim-serve serve`
processes, batched (--max-batch 32) next to one-at-a-time (--max-batch 1), the empty plan next to the AIM default,
for short answers (prefill-bound) and long ones (exactly --long-tokens tokens, EOS ignored: decode-bound), and a
mixed workload arriving open-loop (8- and 16-frame clips, five questions, answers of 4 to 128 tokens).

Closed loop: `concurrency` clients each send their next request as soon as the last one ends (or is rejected),
until `--requests` requests per configuration and level are done. Every request is a video question. Both
engines run as their own server process, loaded side by side; the compared configurations of a level run
interleaved (batched/none, one/none, batched/aim, one/aim, then again), `--repeats` times, and the medians are
reported with the spread over repeats. Mean batch is read from the server's own aim_batch_size histogram over the
level; KV usage is the peak of aim_kv_cache_usage_ratio sampled during it. A last run at a small fixed KV budget
shows how many sequences each plan fits.

    python bench/service_load.py --model models/aim-reference          # the reference model (docs/performance.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.proto.aim.v1 import aim_service_pb2 as pb  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2_grpc as pb_grpc  # noqa: E402


def sample_video(frames: int = 32) -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 96
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            arr = np.full((96, 96, 3), 40, dtype=np.uint8)
            arr[40:56, (3 * t) % 80:(3 * t) % 80 + 16] = (230, 60, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def start_server(model: str, max_queue: int, max_batch: int, extra: list[str] = ()
                 ) -> tuple[subprocess.Popen, str, int]:
    # caches off: every request of these benchmarks repeats one clip, and they measure computing it (batching, the
    # controller); bench/repeated_media.py measures the caches
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--model", model, "--port", "0",
                             "--metrics-port", "0", "--max-queue", str(max_queue), "--max-batch", str(max_batch),
                             "--feature-cache-bytes", "0", "--prefix-cache-bytes", "0", *extra],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"aim-serve listening on ([\d.]+):(\d+); metrics on http://[\d.]+:(\d+)", line)
        if match:
            return proc, f"{match[1]}:{match[2]}", int(match[3])
    raise RuntimeError("server did not start")


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's metrics: {'name{labels}': value}."""
    from urllib.request import urlopen

    out = {}
    for line in urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def batch_totals(metrics: dict[str, float]) -> tuple[float, float]:
    """(sum, count) of aim_batch_size over all models."""
    total = sum(v for k, v in metrics.items() if k.startswith("aim_batch_size_sum"))
    count = sum(v for k, v in metrics.items() if k.startswith("aim_batch_size_count"))
    return total, count


async def run_level(stub, request, concurrency: int, total: int, metrics_port: int) -> dict:
    latencies, ttfts, tokens, rejected, errors = [], [], 0, 0, 0
    issued = 0
    peak_kv = 0.0
    done = asyncio.Event()

    async def sample_kv():
        nonlocal peak_kv
        while not done.is_set():
            values = await asyncio.to_thread(scrape, metrics_port)
            peak_kv = max([peak_kv] + [v for k, v in values.items() if k.startswith("aim_kv_cache_usage_ratio")])
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except asyncio.TimeoutError:
                pass

    async def client():
        nonlocal issued, rejected, errors, tokens
        while issued < total:
            issued += 1
            start = time.perf_counter()
            try:
                reply = await stub.Generate(request, timeout=600)
                latencies.append(time.perf_counter() - start)
                ttfts.append(reply.timings.time_to_first_token_seconds)
                tokens += reply.usage.completion_tokens
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected += 1
                    await asyncio.sleep(0.01)  # a real client backs off
                else:
                    errors += 1

    before = batch_totals(await asyncio.to_thread(scrape, metrics_port))
    sampler = asyncio.create_task(sample_kv())
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    done.set()
    await sampler
    after = batch_totals(await asyncio.to_thread(scrape, metrics_port))
    return level_result(latencies, ttfts, tokens, rejected, errors, elapsed, before, after, peak_kv)


def level_result(latencies, ttfts, tokens, rejected, errors, elapsed, before, after, peak_kv) -> dict:
    """One run's figures: rates over `elapsed`, percentiles, and the mean batch between the two scrapes."""
    steps = after[1] - before[1]

    def pct(values, q):
        if len(values) < 2:
            return values[0] if values else float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    return {"throughput_rps": len(latencies) / elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_p50_s": pct(ttfts, 50), "latency_p50_s": pct(latencies, 50), "latency_p95_s": pct(latencies, 95),
            "mean_batch": (after[0] - before[0]) / steps if steps else 0.0, "kv_usage_peak": peak_kv,
            "rejected_fraction": rejected / max(1, rejected + len(latencies)), "errors": errors,
            "answered": len(latencies)}


async def run_open(stub, requests: list, rate: float, metrics_port: int, seed: int) -> dict:
    """Open loop: `requests` sent at exponential gaps of mean 1 / `rate` seconds (seeded), each by its own caller,
    whether or not the earlier ones are done; then every answer waited for."""
    import random

    rng = random.Random(seed)
    latencies, ttfts, tokens, rejected, errors = [], [], 0, 0, 0

    async def call(request):
        nonlocal tokens, rejected, errors
        start = time.perf_counter()
        try:
            reply = await stub.Generate(request, timeout=600)
            latencies.append(time.perf_counter() - start)
            ttfts.append(reply.timings.time_to_first_token_seconds)
            tokens += reply.usage.completion_tokens
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                rejected += 1
            else:
                errors += 1

    before = batch_totals(await asyncio.to_thread(scrape, metrics_port))
    start, calls = time.perf_counter(), []
    for i, request in enumerate(requests):
        if i:
            await asyncio.sleep(rng.expovariate(rate))
        calls.append(asyncio.create_task(call(request)))
    await asyncio.gather(*calls)
    elapsed = time.perf_counter() - start
    after = batch_totals(await asyncio.to_thread(scrape, metrics_port))
    return level_result(latencies, ttfts, tokens, rejected, errors, elapsed, before, after, 0.0)


MIXED_QUESTIONS = ("Where does the red square move?", "What colour is the square?",
                   "Describe the clip in detail: the background, the object and how it moves.",
                   "Does the square leave the frame?", "Count the objects you see.")
MIXED_TOKENS = (4, 16, 64, 128)


def mixed_requests(videos: dict[int, bytes], plan, count: int, seed: int) -> list:
    """Varied work: 8- or 16-frame clips, five questions, answers of 4 to 128 tokens (EOS ignored, so their
    lengths are what was asked), drawn with a seeded generator."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        frames = rng.choice(sorted(videos))
        out.append(pb.GenerateRequest(
            parts=[pb.ContentPart(video=pb.Video(data=videos[frames], mime_type="video/mp4", num_frames=frames)),
                   pb.ContentPart(text=rng.choice(MIXED_QUESTIONS))],
            sampling=pb.SamplingParams(max_new_tokens=rng.choice(MIXED_TOKENS), ignore_eos=True), reduction=plan))
    return out


def median_row(runs: list[dict]) -> dict:
    """Medians over repeats, with each figure's spread (max - min) / median as `spread`."""
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    row["spread"] = {k: (max(r[k] for r in runs) - min(r[k] for r in runs)) / row[k] if row[k] else 0.0
                     for k in ("throughput_rps", "tokens_per_s", "latency_p95_s")}
    row["repeats"] = len(runs)
    return row


ENGINES = {"batched": 32, "one-at-a-time": 1}


async def main_async(args) -> list[dict]:
    no_warmup = ["--calibrate", "0"]  # explicit plans only: the controller's cost model is not used
    servers = {name: start_server(args.model, args.max_queue, max_batch, no_warmup)
               for name, max_batch in ENGINES.items()}
    small = start_server(args.model, args.max_queue, 32, [*no_warmup, "--kv-cache-bytes", str(args.small_kv_bytes)]) \
        if args.small_kv_bytes else None
    channels = []
    try:
        stubs = {}
        for name, (_, target, port) in servers.items():
            channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
            channels.append(channel)
            stubs[name] = (pb_grpc.AimServiceStub(channel), port)
        info = await next(iter(stubs.values()))[0].GetModelInfo(pb.GetModelInfoRequest())
        video = sample_video()
        plans = {"none": pb.Reduction(none=pb.NoReduction()), "aim-default": pb.Reduction(plan=info.default_plan)}
        workloads = {"short": pb.SamplingParams(max_new_tokens=args.short_tokens),
                     "long": pb.SamplingParams(max_new_tokens=args.long_tokens, ignore_eos=True)}

        def request(plan: str, workload: str) -> pb.GenerateRequest:
            return pb.GenerateRequest(
                parts=[pb.ContentPart(video=pb.Video(data=video, mime_type="video/mp4", num_frames=args.frames)),
                       pb.ContentPart(text="Where does the red square move?")],
                sampling=workloads[workload], reduction=plans[plan])

        for stub, _ in stubs.values():  # warm-up
            for plan in plans:
                await stub.Generate(request(plan, "short"))
        rows = []
        for workload in args.workloads:
            if workload == "mixed":
                await _mixed_rows(args, stubs, plans, rows)
                continue
            levels = args.long_concurrency if workload == "long" and args.long_concurrency else args.concurrency
            for concurrency in levels:
                runs: dict[tuple[str, str], list[dict]] = {}
                total = max(args.requests, concurrency)
                for _ in range(args.repeats):
                    for plan in plans:
                        for engine, (stub, port) in stubs.items():
                            runs.setdefault((engine, plan), []).append(await run_level(
                                stub, request(plan, workload), concurrency, total, port))
                for (engine, plan), results in runs.items():
                    row = {"engine": engine, "plan": plan, "workload": workload, "concurrency": concurrency,
                           **median_row(results)}
                    rows.append(row)
                    print(f"{workload:5s} c={concurrency:3d} {engine:13s} {plan:11s} "
                          f"{row['throughput_rps']:6.2f} req/s "
                          f"{row['tokens_per_s']:7.1f} tok/s  ttft p50 {row['ttft_p50_s']:.3f}s  "
                          f"p50 {row['latency_p50_s']:.3f}s  p95 {row['latency_p95_s']:.3f}s  "
                          f"batch {row['mean_batch']:.1f}  kv {row['kv_usage_peak']:.0%}  "
                          f"spread {row['spread']['throughput_rps']:.0%}", flush=True)
                write_rows(args, rows)  # after every level: a killed run keeps what it measured
        if small is not None:
            await _small_kv_rows(args, small, request, plans, rows)
        return rows
    finally:
        for channel in channels:
            await channel.close()
        for proc, _, _ in list(servers.values()) + ([small] if small else []):
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


async def _mixed_rows(args, stubs, plans, rows: list[dict]) -> None:
    """The open-loop mixed workload at `--mixed-rate` requests/s, each (engine, plan) on the same draws."""
    videos = {8: sample_video(16), 16: sample_video(32)}
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for plan, reduction in plans.items():
            requests = mixed_requests(videos, reduction, args.mixed_requests, seed=repeat)
            for engine, (stub, port) in stubs.items():
                runs.setdefault((engine, plan), []).append(
                    await run_open(stub, requests, args.mixed_rate, port, seed=repeat))
    for (engine, plan), results in runs.items():
        row = {"engine": engine, "plan": plan, "workload": "mixed", "arrivals": "open-loop",
               "rate_rps": args.mixed_rate, "concurrency": 0, **median_row(results)}
        rows.append(row)
        print(f"mixed open-loop {args.mixed_rate}/s {engine:13s} {plan:11s} {row['throughput_rps']:6.2f} req/s "
              f"ttft p50 {row['ttft_p50_s']:.3f}s p50 {row['latency_p50_s']:.3f}s p95 {row['latency_p95_s']:.3f}s "
              f"batch {row['mean_batch']:.1f}", flush=True)
    write_rows(args, rows)


async def _small_kv_rows(args, small, request, plans, rows: list[dict]) -> None:
    """One wave of 16 callers on the server with a small KV budget: how many sequences does each plan fit?"""
    _, target, port = small
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.AimServiceStub(ch)
        for plan in plans:
            row = await run_level(stub, request(plan, "long"), 16, 16, port)
            rows.append({"engine": "batched", "plan": plan, "workload": "long", "concurrency": 16,
                         "kv_cache_bytes": args.small_kv_bytes, **row})
            write_rows(args, rows)
            print(f"small KV budget ({args.small_kv_bytes / 2**20:.0f} MiB), long, c=16, {plan:11s}: "
                  f"mean batch {row['mean_batch']:.1f}, {row['throughput_rps']:.2f} req/s, "
                  f"kv {row['kv_usage_peak']:.0%}", flush=True)


def write_rows(args, rows: list[dict]) -> None:
    setting = {"model": Path(args.model).name, "frames": args.frames, "requests": args.requests,
               "repeats": args.repeats, "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
               "max_queue": args.max_queue}
    Path(args.json_out).write_text(json.dumps([{**r, "setting": setting} for r in rows], indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/aim-reference"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--workloads", nargs="+", default=["short", "long"], choices=["short", "long", "mixed"])
    parser.add_argument("--mixed-rate", type=float, default=0.2, help="open-loop arrivals/s of the mixed workload")
    parser.add_argument("--mixed-requests", type=int, default=16, help="requests per mixed run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--long-concurrency", type=int, nargs="*", default=[],
                        help="levels of the long workload (default: --concurrency)")
    parser.add_argument("--requests", type=int, default=16,
                        help="answered or rejected, per configuration and level (at least the concurrency)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats per configuration and level")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--small-kv-bytes", type=int, default=128 * 2**20,
                        help="the fixed small KV budget of the last run (0 = skip it)")
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/service-batching.json"))
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    write_rows(args, rows)
    print("\n| workload | concurrency | engine | plan | req/s | tokens/s | TTFT p50 s | p50 s | p95 s | mean batch | "
          "KV peak | spread req/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "kv_cache_bytes" in r or r["workload"] == "mixed":
            continue
        print(f"| {r['workload']} | {r['concurrency']} | {r['engine']} | {r['plan']} | {r['throughput_rps']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['latency_p50_s']:.3f} | "
              f"{r['latency_p95_s']:.3f} | "
              f"{r['mean_batch']:.1f} | {100 * r['kv_usage_peak']:.0f}% | {100 * r['spread']['throughput_rps']:.0f}% |")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
