"""Load generator: throughput, p50/p95/p99 latency and rejection rate of a real `aim-serve serve` process at
several concurrency levels, the empty plan and the default AIM plan side by side (interleaved per level).

Closed loop: `concurrency` clients each send their next request as soon as the last one ends (or is rejected),
until `--requests` requests per (plan, level) are done. Every request is a video question.

    python bench/service_load.py --model models/tiny-llava-onevision          # the quickstart's default model
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


def start_server(model: str, max_queue: int, workers: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", model, "--port", "0",
                             "--metrics-port", "-1", "--max-queue", str(max_queue), "--workers", str(workers),
                             *extra],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"aim-serve listening on ([\d.]+):(\d+)", line)
        if match:
            return proc, f"{match[1]}:{match[2]}"
    raise RuntimeError("server did not start")


async def run_level(stub, request, concurrency: int, total: int) -> dict:
    latencies, rejected, errors = [], 0, 0
    issued = 0

    async def client():
        nonlocal issued, rejected, errors
        while issued < total:
            issued += 1
            start = time.perf_counter()
            try:
                await stub.Generate(request, timeout=300)
                latencies.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected += 1
                    await asyncio.sleep(0.01)  # a real client backs off
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 99
    return {"throughput_rps": len(latencies) / elapsed, "p50_s": q[49], "p95_s": q[94], "p99_s": q[98],
            "rejected_fraction": rejected / (rejected + len(latencies)), "errors": errors, "answered": len(latencies)}


async def main_async(args) -> list[dict]:
    proc, target = start_server(args.model, args.max_queue, args.workers)
    try:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.AimServiceStub(ch)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            video = sample_video()
            base = dict(parts=[pb.ContentPart(video=pb.Video(data=video, mime_type="video/mp4",
                                                             num_frames=args.frames)),
                               pb.ContentPart(text="Where does the red square move?")],
                        sampling=pb.SamplingParams(max_new_tokens=args.max_new_tokens))
            plans = {"none": pb.Reduction(none=pb.NoReduction()),
                     "aim-default": pb.Reduction(plan=info.default_plan)}
            for name, reduction in plans.items():  # warm-up
                await stub.Generate(pb.GenerateRequest(**base, reduction=reduction))
            rows = []
            for concurrency in args.concurrency:
                for name, reduction in plans.items():
                    row = await run_level(stub, pb.GenerateRequest(**base, reduction=reduction), concurrency,
                                          args.requests)
                    rows.append({"plan": name, "concurrency": concurrency, **row})
                    print(f"{name:12s} c={concurrency:3d}  {row['throughput_rps']:6.2f} req/s  p50 {row['p50_s']:.3f}s"
                          f"  p95 {row['p95_s']:.3f}s  p99 {row['p99_s']:.3f}s  rejected {row['rejected_fraction']:.0%}",
                          flush=True)
            return rows
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/tiny-llava-onevision"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=40, help="answered or rejected, per plan and level")
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/service-load.json"))
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    for row in rows:
        row["setting"] = {"model": Path(args.model).name, "frames": args.frames, "max_new_tokens": args.max_new_tokens,
                          "max_queue": args.max_queue, "workers": args.workers}
    Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| plan | concurrency | throughput req/s | p50 s | p95 s | p99 s | rejected |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['concurrency']} | {r['throughput_rps']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['p99_s']:.3f} | {100 * r['rejected_fraction']:.0f}% |")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
