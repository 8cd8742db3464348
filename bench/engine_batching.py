"""Engine-level batching benchmark: the serving loop driven in-process, closed loop, batched (max_batch 32) next to
one at a time (max_batch 1), the empty plan next to the AIM default — no gRPC, so it measures the engine alone.

Models: a checkpoint directory (`--model`, e.g. the reference model), or LLaVA-OneVision's architecture with
random weights built from its config on the device (`--arch ov-0.5b|ov-7b`: SigLIP-so400m + Qwen2; no download).
Every request is a video question whose frames go through the vision tower, merging and the LLM; `long` answers
are exactly --new-tokens tokens (EOS ignored). Configurations run interleaved per level and repeat; medians and
the spread over repeats are reported.

    python bench/engine_batching.py --model models/aim-reference --frames 16 --concurrency 1 8
    python bench/engine_batching.py --arch ov-7b --frames 32 --device cuda --dtype bfloat16   # bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine import AimEngine, GenerationRequest, GenerationResult, SamplingParams, TextPart, VideoPart  # noqa: E402
from aim_engine.decoder import ATTENTION_IMPL  # noqa: E402
from bench.prefill_archs import ARCHS, SIGLIP  # noqa: E402

ENGINES = {"batched": 32, "one-at-a-time": 1}


def arch_engine(arch: str, device: str, dtype: torch.dtype, kv_bytes: int | None) -> AimEngine:
    """LLaVA-OneVision with this architecture's LM and SigLIP-so400m, random weights, built on the device."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers import SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from aim_engine.adapters.llava_onevision import LlavaOnevisionAdapter
    from aim_engine.tiny import build_tokenizer, chat_template

    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template("<image>", "<video>")
    text = Qwen2Config(**ARCHS[arch]["text"], max_position_embeddings=32768, tie_word_embeddings=False,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaOnevisionConfig(text_config=text, vision_config=SiglipVisionConfig(**SIGLIP),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    model.config.text_config._attn_implementation = ATTENTION_IMPL
    size = SIGLIP["image_size"]
    processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return AimEngine(LlavaOnevisionAdapter(model, tokenizer, processor), name=arch, kv_cache_bytes=kv_bytes)


def video_frames(count: int, side: int = 96) -> list[Image.Image]:
    """A red square moving on grey, like bench/service_load.py's clip."""
    frames = []
    for t in range(count):
        arr = np.full((side, side, 3), 40, dtype=np.uint8)
        x = (3 * t) % (side - 16)
        arr[side // 2 - 8:side // 2 + 8, x:x + 16] = (230, 60, 60)
        frames.append(Image.fromarray(arr))
    return frames


def run_level(engine: AimEngine, request: GenerationRequest, plan, concurrency: int, total: int) -> dict:
    """Closed loop in-process: `concurrency` requests in flight, a new one as each ends, `total` in all."""
    records, started = [], 0
    batch_sizes, peak_blocks = [], 0
    engine.loop.on_decode_step = lambda step: batch_sizes.append(step.sequences)

    def submit():
        nonlocal started
        started += 1
        record = {"start": time.perf_counter()}

        def emit(event):
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, GenerationResult):
                record.update(end=time.perf_counter(), ttft=event.stats.timings.ttft_s,
                              tokens=event.stats.completion_tokens)
                records.append(record)

        seq = engine.sequence(request, plan, emit)
        seq.arrival = record["start"]
        engine.loop.add(seq)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, total)):
        submit()
    while len(records) < total:
        finished = len(records)
        engine.loop.step()
        peak_blocks = max(peak_blocks, engine.pool.used_blocks)
        for _ in range(len(records) - finished):
            if started < total:
                submit()
    elapsed = time.perf_counter() - t0
    engine.loop.on_decode_step = None
    latencies = sorted(r["end"] - r["start"] for r in records)

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    return {"throughput_rps": total / elapsed, "tokens_per_s": sum(r["tokens"] for r in records) / elapsed,
            "ttft_p50_s": pct([r["ttft"] for r in records], 50), "latency_p50_s": pct(latencies, 50),
            "latency_p95_s": pct(latencies, 95),
            "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else 0.0,
            "kv_peak_bytes": peak_blocks * engine.pool.block_bytes}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (else --arch)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="ov-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--workloads", nargs="+", default=["long"], choices=["short", "long"])
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128, help="long answers: exactly this many tokens")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=4, help="per configuration and level (at least concurrency)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-cache-bytes", type=int, default=0, help="0 = the engine's default")
    parser.add_argument("--json-out", default="")
    return parser.parse_args()


def main() -> None:
    args = _arguments()

    dtype = getattr(torch, args.dtype)
    kv_bytes = args.kv_cache_bytes or None
    if args.model:
        engine = AimEngine.load(args.model, device=args.device, dtype=dtype, kv_cache_bytes=kv_bytes)
        name = Path(args.model).name
    else:
        engine = arch_engine(args.arch, args.device, dtype, kv_bytes)
        name = args.arch
    plans = {"none": engine.default_plan().__class__(), "aim-default": engine.default_plan()}
    parts = [VideoPart(frames=video_frames(args.frames), fps=8.0), TextPart("Where does the red square move?")]
    workloads = {"short": SamplingParams(max_new_tokens=args.short_tokens),
                 "long": SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)}
    print(f"{name} on {args.device} {args.dtype}: KV pool {engine.pool.capacity_bytes / 2**30:.1f} GiB", flush=True)
    for plan in plans.values():  # warm-up
        engine.generate(GenerationRequest(parts, SamplingParams(max_new_tokens=2)), plan)

    rows = []
    for workload in args.workloads:
        request = engine.ingest(GenerationRequest(parts, workloads[workload]))
        for concurrency in args.concurrency:
            runs: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.repeats):
                for plan_name, plan in plans.items():
                    for engine_name, max_batch in ENGINES.items():
                        engine.loop.limit(max_batch)
                        runs.setdefault((engine_name, plan_name), []).append(
                            run_level(engine, request, plan, concurrency, max(args.requests, concurrency)))
            for (engine_name, plan_name), results in runs.items():
                row = {k: statistics.median(r[k] for r in results) for k in results[0]}
                spread = [r["throughput_rps"] for r in results]
                row.update(engine=engine_name, plan=plan_name, workload=workload, concurrency=concurrency,
                           spread_rps=(max(spread) - min(spread)) / row["throughput_rps"], repeats=len(results),
                           setting={"model": name, "device": args.device, "dtype": args.dtype,
                                    "frames": args.frames, "torch": torch.__version__})
                rows.append(row)
                print(f"{workload:5s} c={concurrency:3d} {engine_name:13s} {plan_name:11s} "
                      f"{row['throughput_rps']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                      f"ttft p50 {row['ttft_p50_s']:.3f}s p95 {row['latency_p95_s']:.3f}s "
                      f"batch {row['mean_batch']:.1f} "
                      f"KV peak {row['kv_peak_bytes'] / 2**20:.0f} MiB spread {row['spread_rps']:.0%}", flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.json_out:
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
