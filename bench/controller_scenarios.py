"""The adaptive controller against every fixed ladder level, scenario by scenario, each policy on a fresh server.

Every (model, seed, scenario, policy) run starts its own `aim-serve serve` (the same start-up warm-up calibrates
each one's cost model; caches off, as every request repeats one clip), plays one open-loop Poisson schedule (the
same for every policy of a scenario and seed), and stops the server. Rates come from a calibration run first, on a
server of its own: the full model's service time alone (t_full) and the capacity of the cheapest level (answers
per second with 8 requests in flight, `cap`), for the standard request and for the mixed workload. The cheapest
level is measured, not assumed: every reducing level's capacity is taken (`cap_by_level`) and the highest one
counts, so that a ladder whose pruning levels cost more than merging alone on some machine is sized right.

Scenarios (the standard request: a video question with a short answer; SLO = slo_factor x t_full):
- ramp: 0.3 / t_full rising to 0.85 cap over ramp_s, then a hold;
- burst: a trickle (0.2 / t_full), 0.9 cap for burst_s, the trickle again; the row's `full_after_s` says when,
  after the burst, the adaptive policy first answered at full quality again, and `full_again_s` from when on it
  would have given every request full quality (an estimate of the standard request every PROBE_S after the burst:
  the first answer waits on the trickle's next request);
- mixed: images and 8- and 32-frame videos, answers of 4 and 128 tokens (ignore_eos), at 0.85 of the mix's own cap;
- classes: interactive (SLO = 0.5 x the standard) and batch (2 x) requests, half each, at 0.85 cap;
- adversarial: 20 % of the requests carry the server's smallest SLO (--min-slo-ms); the others the standard SLO.
  The row reports the others; the adversarial tenant's own are in `adversary`;
- no-adversary: the adversarial scenario's schedule without the adversary's requests, the adaptive policy alone:
  the other tenants' retention without it, which the adversarial row's is compared with.
Every request carries a deadline of 3 x its SLO. Failures count as misses.

Writes rows (`scenario`, `model`, `seed`, `policy`, `slo_attainment`, `mean_retention`, `throughput_rps`, `failed`,
with per-class attainment and p95/SLO, and `t_full_at_run_s`: the standard request at full quality, alone on the
run's server just before its schedule, which says how far the machine has moved since the calibration) to
docs/results/controller-scenarios.json after every run (a run already in the file is not repeated: the benchmark
resumes), and a plot per scenario and model.

    python bench/controller_scenarios.py --model models/tiny-llava-onevision --seeds 0 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.controller_ramp import poisson  # noqa: E402
from bench.http_vs_grpc import scene  # noqa: E402
from bench.service_load import sample_video, start_server  # noqa: E402
from controller.policy import default_ladder  # noqa: E402
from service.convert import plan_from_proto, plan_to_proto  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2 as pb  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2_grpc as pb_grpc  # noqa: E402

SCENARIOS = ("ramp", "burst", "mixed", "classes", "adversarial", "no-adversary")
# controls: another scenario's schedule changed in one respect, the adaptive policy alone (no fixed levels), compared
# in numbers with that scenario (no plot of their own)
CONTROLS = ("no-adversary",)
DEFAULT_JSON = ROOT / "docs/results/controller-scenarios.json"  # the docs' results, and their plots beside them
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


class Workload:
    """The requests of a model: the standard one and the mixed ones, as GenerateRequest fields without a reduction."""

    def __init__(self, frames: int, new_tokens: int):
        self.standard = dict(parts=[pb.ContentPart(video=pb.Video(data=sample_video(32), mime_type="video/mp4",
                                                                  num_frames=frames)),
                                    pb.ContentPart(text="Where does the red square move?")],
                             sampling=pb.SamplingParams(max_new_tokens=new_tokens))
        videos = {n: sample_video(max(n, 8)) for n in (8, 32)}
        image = scene(0)
        self.mixed = []
        for media in ("image", 8, 32):
            part = (pb.ContentPart(image=pb.Image(data=image, mime_type="image/png")) if media == "image" else
                    pb.ContentPart(video=pb.Video(data=videos[media], mime_type="video/mp4", num_frames=media)))
            for tokens in (4, 128):
                self.mixed.append(dict(parts=[part, pb.ContentPart(text="Describe what you see.")],
                                       sampling=pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True)))


def schedule(name: str, cal: dict, args, seed: int) -> tuple[list[dict], dict]:
    """The scenario's requests: (at, kind, slo_s, tenant), and what shaped them."""
    if name == "no-adversary":  # what the adversary costs the others: their same requests, without it
        reqs, shape = schedule("adversarial", cal, args, seed)
        others = [r for r in reqs if r["tenant"] != "adversary"]
        return others, dict(shape, requests=len(others), without="adversary")
    rng = random.Random(f"{name}-{seed}")
    t_full, cap, slo = cal["t_full_s"], cal["cap_rps"], args.slo_factor * cal["t_full_s"]
    if name == "ramp":
        start, peak, span = 0.3 / t_full, 0.85 * cap, args.ramp_s + args.hold_s
        times = poisson(lambda t: start + (peak - start) * min(1.0, t / args.ramp_s), span, peak, rng)
        reqs = [dict(at=t, kind="standard", slo_s=slo, tenant="all") for t in times]
        shape = dict(start_rps=start, peak_rps=peak, ramp_s=args.ramp_s, hold_s=args.hold_s)
    elif name == "burst":
        trickle, peak = 0.2 / t_full, 0.9 * cap
        lead, burst, tail = args.lead_s, args.burst_s, args.tail_s
        times = poisson(lambda t: peak if lead <= t < lead + burst else trickle, lead + burst + tail, peak, rng)
        reqs = [dict(at=t, kind="standard", slo_s=slo, tenant="all") for t in times]
        shape = dict(trickle_rps=trickle, peak_rps=peak, burst_start_s=lead, burst_end_s=lead + burst,
                     end_s=lead + burst + tail)
    elif name == "mixed":
        rate = 0.85 * cal["mixed_cap_rps"]
        times = poisson(lambda t: rate, args.hold_s + args.ramp_s / 2, rate, rng)
        slo = args.slo_factor * cal["mixed_t_full_s"]
        reqs = [dict(at=t, kind=rng.randrange(6), slo_s=slo, tenant="all") for t in times]
        shape = dict(rate_rps=rate)
    elif name == "classes":
        rate = 0.85 * cap
        times = poisson(lambda t: rate, args.hold_s + args.ramp_s / 2, rate, rng)
        reqs = [dict(at=t, kind="standard", **(dict(slo_s=0.5 * slo, tenant="interactive") if rng.random() < 0.5
                                               else dict(slo_s=2 * slo, tenant="batch"))) for t in times]
        shape = dict(rate_rps=rate, interactive_slo_s=0.5 * slo, batch_slo_s=2 * slo)
    else:
        rate = 0.85 * cap
        times = poisson(lambda t: rate, args.hold_s + args.ramp_s / 2, rate, rng)
        tiny = args.min_slo_ms / 1000
        reqs = [dict(at=t, kind="standard", **(dict(slo_s=tiny, tenant="adversary") if rng.random() < 0.2
                                               else dict(slo_s=slo, tenant="others"))) for t in times]
        shape = dict(rate_rps=rate, adversary_slo_s=tiny)
    return reqs, dict(shape, slo_s=slo, requests=len(reqs))


PROBE_S = 0.5  # seconds between the estimates that ask, after a burst, which level the adaptive policy would give


async def run_schedule(stub, workload: Workload, reqs: list[dict], shape: dict, policy: str,
                       ladder_protos) -> tuple[list[dict], list[tuple[float, int]]]:
    """Plays `reqs` open-loop; returns every request as the client saw it, and the probes' (seconds, level) where the
    schedule has a burst and the policy is adaptive."""
    records = []

    def reduction(slo_s: float):
        if policy == "adaptive":
            return pb.Reduction(auto=pb.AutoBudget(latency_slo_ms=max(1, round(slo_s * 1000))))
        level = int(policy.split(":")[1])
        return pb.Reduction(plan=ladder_protos[level]) if level else pb.Reduction(none=pb.NoReduction())

    async def one(req: dict):
        await asyncio.sleep(max(0.0, req["at"] - (time.perf_counter() - t0)))
        base = workload.standard if req["kind"] == "standard" else workload.mixed[req["kind"]]
        sent = time.perf_counter() - t0
        record = dict(sent=sent, slo_s=req["slo_s"], tenant=req["tenant"], kind=str(req["kind"]))
        try:
            reply = await stub.Generate(pb.GenerateRequest(**base, reduction=reduction(req["slo_s"])),
                                        timeout=3 * req["slo_s"])
            level = next((i for i, p in enumerate(ladder_protos) if p == reply.applied_plan.plan), -1)
            predicted = re.search(r"([\d.]+)s x [\d.]+", reply.applied_plan.reason)  # the decision's, at face value
            record.update(latency=time.perf_counter() - t0 - sent, ok=True, level=level,
                          retention=reply.usage.visual_tokens_merged / max(1, reply.usage.visual_tokens_in),
                          predicted=float(predicted[1]) if predicted else None,
                          media_s=reply.timings.media_seconds, server_s=reply.timings.total_seconds,
                          queue_s=reply.timings.queue_seconds, ttft_s=reply.timings.time_to_first_token_seconds,
                          reason=reply.applied_plan.reason)
        except grpc.aio.AioRpcError as exc:
            record.update(latency=time.perf_counter() - t0 - sent, ok=False, level=-1, retention=0.0,
                          code=exc.code().name, reason=exc.details())
        records.append(record)

    async def probe(at: float, until: float, slo_s: float):
        """What the controller would give the standard request, asked every PROBE_S from `at` to `until` by an
        estimate (decided as a Generate would be, but no arrival: it changes nothing in the controller)."""
        while at < until:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            sent = time.perf_counter() - t0
            try:
                reply = await stub.EstimateCost(pb.EstimateCostRequest(
                    parts=workload.standard["parts"], sampling=workload.standard["sampling"],
                    reduction=reduction(slo_s)), timeout=slo_s)
                level = next((i for i, p in enumerate(ladder_protos) if p == reply.applied_plan.plan), -1)
            except grpc.aio.AioRpcError:
                level = -1
            probes.append((sent, level))
            at = max(at + PROBE_S, time.perf_counter() - t0)

    t0 = time.perf_counter()
    probes: list[tuple[float, int]] = []
    tasks = [one(r) for r in reqs]
    if policy == "adaptive" and shape.get("burst_end_s") is not None:
        tasks.append(probe(shape["burst_end_s"], shape["end_s"], shape["slo_s"]))
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r["sent"]), probes


def summarize(records: list[dict], duration: float) -> dict:
    answered = [r for r in records if r["ok"]]
    within = [r["ok"] and r["latency"] <= r["slo_s"] for r in records]
    # a failure is a miss however fast it failed: at 3 x SLO (its deadline) for the p95
    ratios = sorted((r["latency"] if r["ok"] else max(r["latency"], 3 * r["slo_s"])) / r["slo_s"] for r in records)
    return {"slo_attainment": sum(within) / max(1, len(records)),
            "mean_retention": statistics.mean(r["retention"] for r in answered) if answered else 0.0,
            "throughput_rps": len(answered) / duration, "failed": len(records) - len(answered),
            "requests": len(records),
            "p95_over_slo": ratios[int(0.95 * (len(ratios) - 1))] if ratios else None}


def row_of(scenario: str, model: str, seed: int, policy: str, records: list[dict], shape: dict, duration: float,
           ladder, probes: list[tuple[float, int]] = ()) -> dict:
    tenants = sorted({r["tenant"] for r in records})
    counted = [r for r in records if r["tenant"] != "adversary"]
    row = {"scenario": scenario, "model": model, "seed": seed, "policy": policy_name(policy, ladder),
           **summarize(counted, duration), "setting": shape}
    if len(tenants) > 1:
        row["per_class"] = {t: summarize([r for r in records if r["tenant"] == t], duration) for t in tenants
                            if t != "adversary"}
    if "adversary" in tenants:
        row["adversary"] = summarize([r for r in records if r["tenant"] == "adversary"], duration)
    if scenario == "burst" and policy == "adaptive":
        end = shape["burst_end_s"]
        full = [r["sent"] - end for r in records if r["ok"] and r["level"] == 0 and r["sent"] >= end]
        row["full_after_s"] = min(full) if full else None  # the first answer at full quality after the burst
        # from when on every probe would have got full quality: what the policy gives whenever a request comes,
        # where the first answer depends on when the trickle's first request happens to come
        later = [t for t, level in probes if level != 0]
        settled = [t for t, level in probes if level == 0 and (not later or t > max(later))]
        row["full_again_s"] = round(min(settled) - end, 3) if settled else None
        row["probes"] = [[round(t - end, 3), level] for t, level in probes]
    # sent, latency, level, answered, tenant, the adaptive decision's predicted latency (None: fixed level, refused,
    # or no prediction), and the server's own media and total seconds (None: not answered): a prediction spans the
    # decision, once the media are decoded, to the answer
    row["timeline"] = [[round(r["sent"], 3), round(r["latency"], 3), r["level"], r["ok"], r["tenant"],
                        None if r.get("predicted") is None else round(r["predicted"], 3),
                        *(round(r[k], 3) if r.get(k) is not None else None for k in ("media_s", "server_s"))]
                       for r in records]
    return row


ADAPTIVE = "adaptive"  # the adaptive policy's name in the rows (--adaptive-name: another build's, side by side)


def policy_name(policy: str, ladder: list[str]) -> str:
    return ADAPTIVE if policy == "adaptive" else f"fixed:{ladder[int(policy.split(':')[1])]}"


FULL = pb.Reduction(none=pb.NoReduction())


async def time_alone(stub, bases) -> float:
    """Mean seconds of these requests at full quality, one after another (each alone on the server)."""
    times = []
    for base in bases:
        start = time.perf_counter()
        await stub.Generate(pb.GenerateRequest(**base, reduction=FULL))
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


async def calibrate(model: str, args) -> dict:
    """t_full (alone) and the cheapest level's capacity (8 in flight), for the standard request and the mix."""
    proc, target, _ = start_server(model, max_queue=64, max_batch=args.max_batch)
    try:
        async with grpc.aio.insecure_channel(target, options=OPTIONS) as ch:
            stub = pb_grpc.AimServiceStub(ch)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            ladder = default_ladder(info.num_layers, plan_from_proto(info.default_plan))
            workload = Workload(args.frames, args.new_tokens)

            async def capacity(bases, count: int, level) -> float:
                queue = list(bases) * (count // len(bases))
                reduction = pb.Reduction(plan=plan_to_proto(level.plan))

                async def worker():
                    while queue:
                        await stub.Generate(pb.GenerateRequest(**queue.pop(), reduction=reduction))

                start = time.perf_counter()
                total = len(queue)
                await asyncio.gather(*(worker() for _ in range(8)))
                return total / (time.perf_counter() - start)

            await time_alone(stub, [workload.standard])  # warm
            t_full = statistics.median([await time_alone(stub, [workload.standard]) for _ in range(3)])
            caps = {level.name: await capacity([workload.standard], 16, level) for level in ladder[1:]}
            cheapest = max(ladder[1:], key=lambda level: caps[level.name])
            mixed_t_full = await time_alone(stub, workload.mixed)
            mixed_cap = await capacity(workload.mixed, 12, cheapest)
            return dict(t_full_s=t_full, cap_rps=caps[cheapest.name], cap_level=cheapest.name, cap_by_level=caps,
                        mixed_t_full_s=mixed_t_full, mixed_cap_rps=mixed_cap, ladder=[level.name for level in ladder])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


async def one_run(model: str, args, workload: Workload, reqs: list[dict], shape: dict,
                  policy: str) -> tuple[list[dict], list, list, float]:
    """One policy on a fresh server: the schedule's records, the probes, the ladder, and the standard request's
    time at full quality alone on that server just before the schedule (against the calibration's t_full: how
    far the machine has moved since it; the same request teaches every policy's cost model alike)."""
    proc, target, _ = start_server(model, max_queue=64, max_batch=args.max_batch,
                                   extra=["--min-slo-ms", str(args.min_slo_ms)])
    try:
        async with grpc.aio.insecure_channel(target, options=OPTIONS) as ch:
            stub = pb_grpc.AimServiceStub(ch)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            ladder = default_ladder(info.num_layers, plan_from_proto(info.default_plan))
            protos = [plan_to_proto(level.plan) for level in ladder]
            t_full_now = await time_alone(stub, [workload.standard])
            records, probes = await run_schedule(stub, workload, reqs, shape, policy, protos)
            return records, probes, ladder, t_full_now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def plot(rows: list[dict], path: Path, ladder) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    adaptive = next(r for r in rows if r["policy"] == "adaptive")
    sent = [t[0] for t in adaptive["timeline"]]
    window = 5.0
    axes[0].plot(sent, [sum(1 for s in sent if x - window < s <= x) / window for x in sent], color="black")
    axes[0].set_ylabel("arrivals (req/s, 5 s)")
    axes[0].set_title(f"{rows[0]['scenario']} on {rows[0]['model']} (seed {rows[0]['seed']})")
    for row in rows:
        if not row["policy"].startswith("adaptive") and row["policy"] not in ("fixed:full", f"fixed:{ladder[-1]}"):
            continue
        xs, ys = [], []
        tl = row["timeline"]
        for i, t in enumerate(tl):
            recent = tl[max(0, i - 19): i + 1]
            ratios = sorted((r[1] if r[3] else 3 * row["setting"]["slo_s"]) / row["setting"]["slo_s"] for r in recent)
            xs.append(t[0])
            ys.append(ratios[int(0.95 * (len(ratios) - 1))])
        axes[1].plot(xs, ys, label=row["policy"])
    axes[1].axhline(1.0, color="black", linestyle="--")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("rolling p95 latency / SLO")
    axes[1].legend(loc="upper left", fontsize=8)
    ok = [t for t in adaptive["timeline"] if t[3]]
    axes[2].scatter([t[0] for t in ok], [t[2] for t in ok], s=8, color="tab:green")
    axes[2].set_yticks(range(len(ladder)), ladder)
    axes[2].set_ylabel("adaptive: level")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(data: dict) -> None:
    for (scenario, model, seed) in sorted({(r["scenario"], r["model"], r["seed"]) for r in data["rows"]}):
        rows = [r for r in data["rows"] if (r["scenario"], r["model"], r["seed"]) == (scenario, model, seed)]
        if seed == min(r["seed"] for r in data["rows"]) and any(r["policy"] == "adaptive" for r in rows) \
                and scenario not in CONTROLS:
            plot(rows, ROOT / "docs" / f"controller-{scenario}-{model}.png", data["calibration"][model]["ladder"])


async def main_async(args) -> None:
    out = Path(args.json_out)
    data = json.loads(out.read_text()) if out.exists() else {"calibration": {}, "rows": []}
    if args.plots_only:
        plot_all(data)
        return
    for model in args.model:
        name = Path(model).name
        frames = args.frames if args.frames else (8 if "reference" in name else 32)
        args_model = argparse.Namespace(**{**vars(args), "frames": frames})
        if name not in data["calibration"]:
            data["calibration"][name] = await calibrate(model, args_model)
            out.write_text(json.dumps(data, indent=1) + "\n")
        cal = data["calibration"][name]
        print(name, json.dumps(cal), flush=True)
        workload = Workload(frames, args.new_tokens)
        for seed in args.seeds:
            for scenario in args.scenarios:
                reqs, shape = schedule(scenario, cal, args_model, seed)
                duration = max(r["at"] for r in reqs) if reqs else 1.0
                chosen = args.fixed if args.fixed is not None else range(args.levels)
                fixed = [f"fixed:{i}" for i in chosen] if scenario not in CONTROLS else []
                for policy in ([] if args.no_adaptive else ["adaptive"]) + fixed:
                    key = (scenario, name, seed, policy_name(policy, cal["ladder"]))
                    if key in {(r["scenario"], r["model"], r["seed"], r["policy"]) for r in data["rows"]}:
                        continue
                    records, probes, ladder, t_full_now = await one_run(model, args_model, workload, reqs, shape,
                                                                        policy)
                    if args.records_out:  # every request as the client saw it, for a closer look
                        with open(args.records_out, "a") as f:
                            f.write(json.dumps(dict(key=key, records=records)) + "\n")
                    row = row_of(scenario, name, seed, policy, records, shape, duration, cal["ladder"], probes)
                    row["t_full_at_run_s"] = round(t_full_now, 3)
                    data["rows"].append(row)
                    out.write_text(json.dumps(data, indent=1) + "\n")
                    print(f"{scenario} {name} seed {seed} {row['policy']}: within SLO "
                          f"{100 * row['slo_attainment']:.1f}%, retention {row['mean_retention']:.3f}, "
                          f"{row['throughput_rps']:.2f} req/s, failed {row['failed']}, t_full now "
                          f"{t_full_now / cal['t_full_s']:.2f}x calibrated, p95/SLO "
                          f"{row['p95_over_slo']:.2f}" + (f", full again {row['full_again_s']} s (first full answer "
                                                          f"{row['full_after_s']} s)" if "full_again_s" in row else ""),
                          flush=True)
                rows = [r for r in data["rows"] if (r["scenario"], r["model"], r["seed"]) == (scenario, name, seed)]
                if any(r["policy"] == "adaptive" for r in rows) and seed == args.seeds[0] and ADAPTIVE == "adaptive" \
                        and scenario not in CONTROLS \
                        and out.resolve() == DEFAULT_JSON:  # a trial run elsewhere leaves the docs' plots alone
                    plot(rows, ROOT / "docs" / f"controller-{scenario}-{name}.png", cal["ladder"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[str(ROOT / "models/tiny-llava-onevision")])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--levels", type=int, default=5, help="fixed ladder levels run, from full (the ladder's 5)")
    parser.add_argument("--fixed", type=int, nargs="+", help="the fixed ladder levels run, by index (instead of "
                                                             "--levels)")
    parser.add_argument("--frames", type=int, default=0, help="frames of the standard video (0: 8 on the reference "
                                                               "model, 32 otherwise)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--slo-factor", type=float, default=6.0)
    parser.add_argument("--ramp-s", type=float, default=20.0)
    parser.add_argument("--hold-s", type=float, default=20.0)
    parser.add_argument("--lead-s", type=float, default=5.0)
    parser.add_argument("--burst-s", type=float, default=20.0)
    parser.add_argument("--tail-s", type=float, default=15.0)
    parser.add_argument("--min-slo-ms", type=int, default=50)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--adaptive-name", default="adaptive",
                        help="the adaptive policy's name in the rows (e.g. another build's, run from its checkout)")
    parser.add_argument("--no-adaptive", action="store_true", help="fixed levels only")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from the JSON, run nothing")
    parser.add_argument("--json-out", default=str(DEFAULT_JSON))
    parser.add_argument("--records-out", help="append every run's requests (timings, reasons) to this JSON-lines file")
    args = parser.parse_args()
    global ADAPTIVE
    ADAPTIVE = args.adaptive_name
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
