"""The what-if on known work, in process: how close the controller's prediction is when nothing arrives after it.

The served model runs in this process (no gRPC, no client, no media decoding beside it) with the service's
default limits (service/settings.py: batch, prompt tokens admitted per step, step budget), its cost model seeded
by the service's start-up warm-up (service/warmup.py). Then, for the full model and the ladder's last level, 1, 4 and
8 copies of the standard request (a video question with a short answer) are added to the idle engine at once; the
controller's what-if (controller.whatif.finish_times over the engine's load, the fitted rates at face value)
predicts when each will be answered, and the loop runs them. Every finished request teaches the cost model, as in
the service. Writes docs/results/whatif-known-work.json: per level and count, the predicted and observed seconds
and the median observed / predicted.

    python bench/whatif_known_work.py --model models/tiny-llava-onevision
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine import AimEngine, GenerationRequest, GenerationResult, ReductionPlan, SamplingParams  # noqa: E402
from aim_engine import StepBudget, TextPart, VideoPart  # noqa: E402
from bench.service_load import sample_video  # noqa: E402
from controller.controller import BudgetController  # noqa: E402
from controller.policy import default_ladder  # noqa: E402
from service.runtime import stage_rates  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.warmup import observation_of, warm_up  # noqa: E402


def run(engine: AimEngine, controller: BudgetController, plan: ReductionPlan, count: int, video: bytes,
        frames: int, new_tokens: int) -> tuple[list[float], list[float]]:
    """`count` standard requests added at once: (predicted, observed) seconds until each is answered."""
    added = []
    for i in range(count):
        request = GenerationRequest([VideoPart(data=video, mime_type="video/mp4", num_frames=frames),
                                     TextPart(f"Where does the red square move? ({i})")],
                                    SamplingParams(max_new_tokens=new_tokens))
        events: queue.SimpleQueue = queue.SimpleQueue()
        added.append((engine.sequence(engine.ingest(request), plan, events.put), events, request))
    for seq, _, _ in added:
        engine.loop.add(seq)
    features = controller.features([], engine.loop.load(time.monotonic()), math.inf, 0.0, "normal", None,
                                   controller.cost_model)
    predicted = list(features.admitted_finish)
    start = time.perf_counter()
    observed: dict[int, float] = {}
    while len(observed) < count:
        engine.loop.step()  # this thread drives the loop: nothing else runs beside it
        for k, (_, events, request) in enumerate(added):
            while not events.empty():
                event = events.get()
                if isinstance(event, GenerationResult):
                    observed[k] = time.perf_counter() - start
                    controller.learn(observation_of(event.stats, 0.0, request.sampling))
    engine.loop.rates = stage_rates(controller.cost_model)
    return predicted, [observed[k] for k in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-llava-onevision")
    parser.add_argument("--frames", type=int, default=32, help="frames of the standard request's video")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json-out", default=str(ROOT / "docs" / "results" / "whatif-known-work.json"))
    args = parser.parse_args()
    engine = AimEngine.load(args.model)
    defaults = Settings()
    engine.loop.limit(max(defaults.max_batch, max(args.counts)), defaults.prefill_tokens_per_step,
                      StepBudget(None if defaults.step_budget < 0 else defaults.step_budget))
    ladder = default_ladder(engine.num_layers, engine.default_plan())
    controller = BudgetController(ladder)
    warm_up(engine, controller, rounds=1)
    engine.loop.rates = stage_rates(controller.cost_model)
    video = sample_video(32)
    rows = []
    for level in (ladder[0], ladder[-1]):
        for count in args.counts:
            predicted, observed = run(engine, controller, level.plan, count, video, args.frames, args.new_tokens)
            row = {"model": Path(args.model).name, "level": level.name, "requests": count,
                   "predicted_s": [round(p, 3) for p in predicted], "observed_s": [round(o, 3) for o in observed],
                   "observed_over_predicted_p50": round(statistics.median(o / p for o, p in zip(observed, predicted)),
                                                        3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.json_out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    names = {r["model"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["model"] not in names] + rows
    data["command"] = "python bench/whatif_known_work.py --model models/<model>"
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
