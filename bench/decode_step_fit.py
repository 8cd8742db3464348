"""Which KV count a decode step's time follows: the sum of the batch's KV tokens, or the keys its attention reads,
each row padded to the longest (aim_engine/decode_read.py). Writes docs/results/decode-step-fit.json.

The served model runs in process on its own loop thread, as the service runs it, under mixed open-loop work:
images and 8- and 32-frame videos (each a distinct synthetic clip), answers of 4, 32 and 128 tokens (EOS ignored,
so the lengths are the ones drawn), unreduced or under the model's default plan, arriving with exponential gaps
(seeded). Every decode step is recorded as it ran (ServingLoop.on_decode_step: its sequences, the keys it read,
its seconds), with the sum of its members' KV beside it. Both counts are then fitted to the same steps the way
the controller fits them (controller.linear_fit: exponentially weighted non-negative least squares of a + b x
sequences + c x KV), online: each step is predicted from the steps before it, and so is each request's decode
time (its steps x the step at its mean batch and mean KV, from the requests finished before it: the points the
cost model learns from); and each half of the steps from a fit to the other half (`_across`: whether the term
carries to batches of another make-up, as the what-if needs it to; the online fit, following the last few steps,
hides that). Reported per model and seed: the median and 90th percentile of |predicted / observed - 1|, and the
median signed error (bias).

    python bench/decode_step_fit.py --model models/aim-reference --seeds 1 2 3
    python bench/decode_step_fit.py --model models/tiny-llava-onevision --seeds 1 2 3 --gap 0.5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine import AimEngine, GenerationRequest, GenerationResult, ReductionPlan, SamplingParams  # noqa: E402
from aim_engine import TextPart, VideoPart  # noqa: E402
from aim_engine.request import ImagePart  # noqa: E402
from bench.engine_step import clip, stream_image  # noqa: E402
from controller.cost_model import STEP_SMOOTHING  # noqa: E402
from controller.linear_fit import LinearFit  # noqa: E402

COUNTS = ("summed", "padded")  # the KV term: the members' KV tokens summed, or the keys the attention reads


def run(model: str, seed: int, requests: int, gap: float, max_batch: int) -> tuple[list[dict], list[dict]]:
    """One run: every decode step (sequences, both KV counts, seconds) and every request (steps, mean batch, both
    mean KV counts, decode seconds), in the order they happened."""
    engine = AimEngine.load(model)
    engine.loop.limit(max_batch)
    batch = engine.loop.runner.batch
    steps: list[dict] = []
    served: dict[int, list[tuple[float, float]]] = {}  # id(a sequence's stats) -> its steps' (summed, padded)

    def on_step(step) -> None:  # after the step, before its tokens are accepted: the members are the ones served
        summed = sum(float(kv.lengths.mean()) for kv in batch.members)
        steps.append({"sequences": step.sequences, "summed": summed, "padded": step.kv_read, "s": step.seconds})
        for seq in engine.loop.scheduler.running:  # the loop's thread: the batch is as the step left it
            if seq.kv is not None and seq.kv.batch_row is not None:
                served.setdefault(id(seq.stats), []).append((summed, step.kv_read))

    engine.loop.on_decode_step = on_step
    engine.loop.start()
    rng = random.Random(seed)
    plans = [ReductionPlan(), engine.default_plan()]
    done: list[dict] = []
    lock = threading.Lock()

    def one(k: int, kind: str, tokens: int, plan: ReductionPlan) -> None:
        if kind == "image":
            part = ImagePart(image=stream_image(seed * 100 + k))
        else:
            frames = 8 if kind == "video-8" else 32
            part = VideoPart(data=clip(seed * 1000 + k, frames), mime_type="video/mp4", num_frames=frames)
        request = GenerationRequest([part, TextPart(f"Describe what you see, item {k}.")],
                                    SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        for event in engine.stream(request, plan):
            if isinstance(event, GenerationResult):
                stats = event.stats  # the object its sequence carried (on_step's key)
                mine = served.pop(id(stats), [])
                with lock:
                    done.append({"kind": kind, "tokens": tokens, "steps": stats.decode_steps,
                                 "mean_batch": stats.mean_batch, "decode_s": stats.timings.decode_steps_s,
                                 "mean_summed": statistics.fmean(m[0] for m in mine) if mine else 0.0,
                                 "mean_padded": statistics.fmean(m[1] for m in mine) if mine else 0.0,
                                 "engine_mean_kv": stats.mean_kv_attended, "recorded_steps": len(mine)})

    threads = []
    for k in range(requests):
        if k:
            time.sleep(rng.expovariate(1.0 / gap))
        args = (k, rng.choice(["image", "video-8", "video-32"]), rng.choice([4, 32, 128]), rng.choice(plans))
        thread = threading.Thread(target=one, args=args)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    engine.loop.close()
    return steps, done


def errors(predicted: list[float], observed: list[float]) -> dict:
    rel = [p / o - 1 for p, o in zip(predicted, observed) if o > 0]
    ordered = sorted(abs(e) for e in rel)
    return {"n": len(rel), "abs_err_p50": round(statistics.median(ordered), 4),
            "abs_err_p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
            "bias_p50": round(statistics.median(rel), 4)}


def online(points: list[tuple[float, float, float]]) -> list[float | None]:
    """Each point's y predicted from the points before it: (sequences, kv, y) fitted as the cost model fits a
    decode step (LinearFit(3), its smoothing); None before the first."""
    fit = LinearFit(3, prefer=(0, 1, 2), smoothing=STEP_SMOOTHING)
    out = []
    for n, kv, y in points:
        line = fit.coefficients()
        out.append(None if line is None else line[0] + line[1] * n + line[2] * kv)
        fit = fit.add((n, kv), y)
    return out


def across(points: list[tuple[float, float, float]]) -> list[float]:
    """Each half's ys predicted from the other half (every point weighed alike): how the term carries to batches
    of another make-up, which is what the what-if asks of it."""
    half = len(points) // 2
    out = []
    for fit_on, predict in ((points[:half], points[half:]), (points[half:], points[:half])):
        fit = LinearFit(3, prefer=(0, 1, 2), smoothing=0.0)
        for n, kv, y in fit_on:
            fit = fit.add((n, kv), y)
        a, b, c = fit.coefficients()
        out += [a + b * n + c * kv for n, kv, _ in predict]
    return out


def evaluate(steps: list[dict], requests: list[dict]) -> dict:
    result = {}
    warm = 5  # the first points only start the fit
    # requests whose every decode step was recorded (their mean KV of both counts is known)
    usable = [r for r in requests if r["steps"] > 0 and r["recorded_steps"] == r["steps"]]
    for count in COUNTS:
        points = [(s["sequences"], s[count], s["s"]) for s in steps]
        predicted = online(points)
        result[f"steps_{count}"] = errors(predicted[warm:], [s["s"] for s in steps][warm:])
        half = len(points) // 2
        result[f"steps_{count}_across"] = errors(across(points), [y for *_, y in points[half:] + points[:half]])
        points = [(r["mean_batch"], r[f"mean_{count}"], r["decode_s"] / r["steps"]) for r in usable]
        per_step = online(points)
        result[f"requests_{count}"] = errors([p * r["steps"] for p, r in zip(per_step[warm:], usable[warm:])],
                                             [r["decode_s"] for r in usable[warm:]]) \
            if len(usable) > warm else None
    result["requests_fitted"] = len(usable)
    result["engine_kv_mismatch"] = max((abs(r["engine_mean_kv"] - r["mean_padded"]) for r in requests
                                        if r["recorded_steps"]), default=0.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/aim-reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--gap", type=float, default=1.0, help="mean seconds between arrivals")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json-out", default=str(ROOT / "docs" / "results" / "decode-step-fit.json"))
    parser.add_argument("--raw-out", help="also write every step and request recorded here (JSON lines)")
    args = parser.parse_args()
    out = Path(args.json_out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    name = Path(args.model).name
    for seed in args.seeds:
        steps, requests = run(args.model, seed, args.requests, args.gap, args.max_batch)
        if args.raw_out:
            with open(args.raw_out, "a") as raw:
                raw.write(json.dumps({"model": name, "seed": seed, "steps": steps, "requests": requests}) + "\n")
        row = {"model": name, "seed": seed, "gap_s": args.gap, "max_batch": args.max_batch, "steps": len(steps),
               "requests": len(requests),
               "padded_over_summed_p50": round(statistics.median(s["padded"] / s["summed"] for s in steps), 3),
               **evaluate(steps, requests)}
        print(json.dumps(row), flush=True)
        data["rows"] = [r for r in data["rows"] if (r["model"], r["seed"]) != (name, seed)] + [row]
        data["command"] = ("python bench/decode_step_fit.py --model models/aim-reference --seeds 1 2 3; "
                           "the same with --model models/tiny-llava-onevision --gap 0.5")
        out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
