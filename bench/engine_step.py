"""The engine step under arrivals: sliced prefill against unsliced, and a decode step's host work before and after
the persistent batch. Writes docs/results/engine-step.json.

1. `rows`, the running batch under arrivals (the served model, in process, its own loop thread): `--streams`
   long answers (image questions, `--stream-tokens` tokens each, EOS ignored) decode while video questions arrive
   open-loop (exponential gaps of mean `--gap` seconds, seeded; 8- and 16-frame clips, each a distinct synthetic
   clip, so no cache hit; answers of at most 8 tokens), under the plan of the row (none, or the model's default).
   The work is the same in every configuration. Each starts from a fresh engine with the same warm-up
   (service/warmup.py, which seeds the controller's cost model), and like the service it teaches the cost model
   every finished request and hands the engine its rates, which predict the step budget. Slicing off and on (at
   each `--step-budget`) are interleaved, `--repeats` times; each figure is the median over repeats. Reported:
   the streams' inter-token gaps (p50 / p99 / max, from the first arrival to the last arrival's end, while the
   streams decode), the
   arrivals' TTFT (p50), and requests/s (every request, streams included, over the makespan).
2. `host_step`: what a decode step does before the model call (the batch's KV state and the step's inputs), at
   28 layers, 4 KV heads of 128, bf16, one thread, for 8 x 1000, 32 x 500, 32 x 2000 and 64 x 2000 (sequences x
   tokens: 32 x 500 shows it does not grow with the tokens held).
   "before" is the per-step rebuild this project had until the persistent batch (kv_pool.DecodeBatchKV, loaded
   from git at `--before-rev`); "after" is kv_pool.DecodeBatch. Beside it, `attention_gather_ms`: the fallback
   attention's gathering of every layer's keys and values (and their masks) for one step, which a paged kernel
   would not do, measured for both.

    python bench/engine_step.py --model models/aim-reference         # both parts (docs/performance.md)
    python bench/engine_step.py --part host                          # the microbenchmark alone (~1 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine import AimEngine, GenerationRequest, GenerationResult, ReductionPlan, SamplingParams  # noqa: E402
from aim_engine import StepBudget, TextPart, VideoPart  # noqa: E402
from aim_engine.request import ImagePart  # noqa: E402
from aim_engine import kv_pool  # noqa: E402

BEFORE_REV = "a63131b"  # the last commit with the per-step rebuild (DecodeBatchKV)


# ---- 1. the running batch under arrivals ----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def clip(seed: int, frames: int) -> bytes:
    """A distinct synthetic clip (its own size, frame count and motion), so no two arrivals share features."""
    from tests.media_samples import encode_video

    rng = random.Random(seed)
    return encode_video(frames=frames * 2 + rng.randrange(8), size=(96 + 8 * rng.randrange(4), 128), fps=8)


def stream_image(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8))


def running_batch(model: str, slicing: str, multiple: float | None, plan_name: str, seed: int, args) -> dict:
    from controller.controller import BudgetController
    from controller.policy import default_ladder
    from service.runtime import stage_rates
    from service.warmup import observation_of, warm_up

    engine = AimEngine.load(model)
    budget = StepBudget(multiple)
    engine.loop.limit(args.max_batch, budget=budget)
    controller = BudgetController(default_ladder(engine.num_layers, engine.default_plan()))
    warm_up(engine, controller, rounds=1)
    lock = threading.Lock()

    def learn(stats, sampling) -> None:  # as the service does after every answer: the rates follow the traffic
        with lock:
            controller.learn(observation_of(stats, 0.0, sampling))
            engine.loop.rates = stage_rates(controller.cost_model)

    engine.loop.rates = stage_rates(controller.cost_model)
    engine.loop.start()
    plan = ReductionPlan() if plan_name == "none" else engine.default_plan()
    rng = random.Random(seed)
    steps: list[float] = []  # when each decode step ended: every running sequence's token came out then
    engine.loop.on_decode_step = lambda step: steps.append(time.perf_counter())
    ends: list[float] = []
    stream_ends: list[float] = []

    def streamer(i: int) -> None:
        request = GenerationRequest([ImagePart(image=stream_image(seed * 100 + i)),
                                     TextPart(f"Describe image {i} at length, every detail.")],
                                    SamplingParams(max_new_tokens=args.stream_tokens, ignore_eos=True))
        for event in engine.stream(request, plan):
            if isinstance(event, GenerationResult):
                learn(event.stats, request.sampling)
        ends.append(time.perf_counter())
        stream_ends.append(ends[-1])

    arrivals: list[dict] = []

    def arrival(k: int, frames: int) -> None:
        request = GenerationRequest([VideoPart(data=clip(seed * 1000 + k, frames), mime_type="video/mp4",
                                               num_frames=frames), TextPart("Which way does the square move?")],
                                    SamplingParams(max_new_tokens=8))
        result = [e for e in engine.stream(request, plan) if isinstance(e, GenerationResult)][0]
        learn(result.stats, request.sampling)
        arrivals.append({"end": time.perf_counter(), "ttft_s": result.stats.timings.ttft_s})
        ends.append(time.perf_counter())

    begin = time.perf_counter()
    streams = [threading.Thread(target=streamer, args=(i,)) for i in range(args.streams)]
    for thread in streams:
        thread.start()

    def decoding() -> bool:
        running = list(engine.loop.scheduler.running)
        return len(running) == args.streams and all(s.work is None for s in running)

    while not decoding() or len(steps) < 3:  # every stream past its prefill
        time.sleep(0.05)
    first = time.perf_counter()
    threads = []
    for k in range(args.arrivals):
        if k:
            time.sleep(rng.expovariate(1.0 / args.gap))
        thread = threading.Thread(target=arrival, args=(k, 8 if k % 2 == 0 else 16))
        thread.start()
        threads.append(thread)
    for thread in threads + streams:
        thread.join()
    engine.loop.close()
    # the window: from the first arrival until the last is answered, while every stream still decodes (after a
    # stream ends, its gaps are nobody's)
    window_end = min(max(a["end"] for a in arrivals), min(stream_ends))
    # the streams' inter-token gaps while the arrivals came and were served (between consecutive decode steps:
    # each gives every running sequence its next token; measured at the step, since a token whose text is not
    # final yet reaches the caller with the next one)
    gaps = [b - a for a, b in zip(steps, steps[1:]) if first <= b <= window_end]
    return {"slicing": slicing, "plan": plan_name, "seed": seed, "step_budget": budget.multiple,
            "itl_p50_s": statistics.median(gaps), "itl_p99_s": percentile(gaps, 0.99), "itl_max_s": max(gaps),
            "ttft_p50_s": statistics.median(a["ttft_s"] for a in arrivals),
            "throughput_rps": (args.streams + args.arrivals) / (max(ends) - begin), "gaps": len(gaps),
            "makespan_s": max(ends) - begin, "window_covers_arrivals": window_end >= max(a["end"] for a in arrivals)}


def running_rows(args) -> list[dict]:
    rows = []
    configs = [("off", None)] + [("on", budget) for budget in args.step_budget]
    for plan_name in args.plans:
        runs: dict[tuple, list[dict]] = {config: [] for config in configs}
        for repeat in range(args.repeats):
            for slicing, budget in configs:  # interleaved, each on a fresh engine
                run = running_batch(args.model, slicing, budget, plan_name, args.seed + repeat, args)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}),
                      flush=True)
                runs[slicing, budget].append(run)
        for (slicing, budget), got in runs.items():
            row = {"slicing": slicing, "plan": plan_name, "step_budget": budget, "repeats": len(got)}
            for field in ("itl_p50_s", "itl_p99_s", "itl_max_s", "ttft_p50_s", "throughput_rps"):
                row[field] = round(statistics.median(r[field] for r in got), 4)
            rows.append(row)
    return rows


# ---- 2. a decode step's host work -----------------------------------------------------------------------------
def old_kv_pool(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:aim_engine/kv_pool.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("kv_pool_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:aim_engine/kv_pool.py", "exec"), module.__dict__)
    return module


def host_step(module, build: str, sequences: int, tokens: int, steps: int, gathers: int, device: str = "cpu",
              layers: int = 28, kv_heads: int = 4, head_dim: int = 128) -> dict:
    dtype = torch.bfloat16
    layout = module.KVLayout(layers, kv_heads, head_dim, dtype)
    need = [tokens + steps + gathers + module.BLOCK_SIZE] * layers
    pool = module.KVPool(layout, sequences * module.KVPool.bytes_for(layout, need), device=device)
    seqs = []
    for i in range(sequences):
        kv = pool.reserve(need)
        for layer in range(layers):  # lengths differ a little, as real prompts do (the gather pads)
            kv.append_slots(layer, tokens - (i * 7) % 50)
        seqs.append(kv)
    positions = [tokens + i for i in range(sequences)]
    windows = [None] * layers
    host, gather = [], []
    if build == "before":
        for step in range(steps + gathers):
            start = time.perf_counter()
            next_tokens = torch.tensor([[1] for _ in seqs], device=device)
            pos = torch.tensor([[p + step] for p in positions], device=device)
            batch = module.DecodeBatchKV(pool, seqs, device, dtype, positions=pos[:, 0], windows=windows)
            host.append(time.perf_counter() - start)
            if step >= steps:
                start = time.perf_counter()
                for layer in range(layers):
                    flat = batch.gather[layer].flatten()
                    pool.keys.index_select(0, flat), pool.values.index_select(0, flat), batch.mask(layer)
                _sync(device)
                gather.append(time.perf_counter() - start)
            del next_tokens
        host = host[:steps]
    else:
        batch = module.DecodeBatch(pool, windows)
        for kv in seqs:
            batch.join(kv)
        for step in range(steps + gathers):
            start = time.perf_counter()
            batch.outgrown()
            next_tokens = torch.tensor([[1] for _ in batch.members], device=device)
            pos = torch.tensor([[p + step] for p in positions], device=device)
            decode = batch.step(pos[:, 0], dtype)
            host.append(time.perf_counter() - start)
            if step >= steps:
                start = time.perf_counter()
                for layer in range(layers):
                    paged = decode.mask(layer)
                    for rows in paged.groups():
                        paged.keys_and_mask(rows)
                _sync(device)
                gather.append(time.perf_counter() - start)
            del next_tokens
        host = host[:steps]
    return {"build": build, "layers": layers, "sequences": sequences, "tokens": tokens,
            "host_ms": round(1000 * statistics.median(host), 3),
            "attention_gather_ms": round(1000 * statistics.median(gather), 1)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def host_rows(args) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _host_rows(args)
    finally:
        torch.set_num_threads(threads)


def _host_rows(args) -> list[dict]:
    builds = [("after", kv_pool)]
    try:
        builds.insert(0, ("before", old_kv_pool(args.before_rev)))
    except (OSError, subprocess.CalledProcessError) as exc:  # no git history here (a copied tree): "after" only
        print(f"no 'before' build: {exc}", flush=True)
    rows = []
    for sequences, tokens in ((8, 1000), (32, 500), (32, 2000), (64, 2000)):
        for build, module in builds:
            row = host_step(module, build, sequences, tokens, steps=args.host_steps, gathers=2, device=args.device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/aim-reference")
    parser.add_argument("--part", choices=("all", "running", "host"), default="all")
    parser.add_argument("--plans", nargs="+", default=["none", "default"])
    parser.add_argument("--streams", type=int, default=3, help="long answers decoding through the arrivals")
    parser.add_argument("--stream-tokens", type=int, default=400, help="tokens each long answer generates")
    parser.add_argument("--arrivals", type=int, default=6, help="video questions per run")
    parser.add_argument("--gap", type=float, default=3.0, help="mean seconds between arrivals (exponential)")
    parser.add_argument("--step-budget", type=float, nargs="+", default=[1.0, 4.0],
                        help="the step budgets run with slicing on")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--host-steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="where the microbenchmark's pool lives (cuda: host work is "
                        "then what the CPU spends launching the step; the gathers are synchronised)")
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/engine-step.json"))
    args = parser.parse_args()
    out = Path(args.json_out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if args.part in ("all", "host"):
        result["host_step"] = host_rows(args)
        result["host_step_setup"] = {"threads": 1, "kv_heads": 4, "head_dim": 128, "dtype": "bfloat16",
                                     "device": args.device,
                                     "before_rev": args.before_rev, "steps": args.host_steps}
    if args.part in ("all", "running"):
        result["rows"] = running_rows(args)
        result["setup"] = {"model": args.model, "streams": args.streams, "arrivals": args.arrivals,
                           "gap_s": args.gap, "frames": [8, 16], "repeats": args.repeats, "seed": args.seed,
                           "step_budgets_on": args.step_budget, "torch_threads": torch.get_num_threads()}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
