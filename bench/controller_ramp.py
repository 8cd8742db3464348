"""The adaptive controller against two fixed policies under the same load ramp, on a real `aim-serve serve`.

Policies: always_full (no reduction), always_max_saving (the ladder's last level), adaptive (`auto` with the
SLO). Each sees the same open-loop Poisson arrival schedule (same seed): the rate ramps linearly from
`start` to `peak` requests/s, then holds. The rates and the SLO are set from service times measured first:
start = 0.3 / t_full, peak = 0.75 / t_max_saving, SLO = 5 x t_full — so at the peak the full model is
overloaded and maximum saving is not. Every request carries a deadline of 3 x SLO, which bounds the run.

Per policy: share of requests answered within the SLO, mean visual-token retention (the quality proxy),
throughput. Writes docs/results/controller.json and a plot (load, rolling p95 vs SLO, adaptive level).

    python bench/controller_ramp.py --model models/tiny-llava-onevision
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_load import sample_video, start_server  # noqa: E402
from controller.policy import default_ladder  # noqa: E402
from service.convert import plan_from_proto, plan_to_proto  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2 as pb  # noqa: E402
from service.proto.aim.v1 import aim_service_pb2_grpc as pb_grpc  # noqa: E402


def poisson(rate_at, until: float, peak: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of rate rate_at(t) <= peak (thinning of a process at the peak rate)."""
    t, times = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t > until:
            return times
        if rng.random() < rate_at(t) / peak:
            times.append(t)


def arrival_times(start_rate: float, peak_rate: float, ramp_s: float, hold_s: float, seed: int) -> list[float]:
    """Poisson arrivals with a linearly ramping rate."""
    return poisson(lambda t: start_rate + (peak_rate - start_rate) * min(1.0, t / ramp_s), ramp_s + hold_s,
                   peak_rate, random.Random(seed))


async def service_time(stub, base: dict, reduction, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await stub.Generate(pb.GenerateRequest(**base, reduction=reduction))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


async def run_policy(stub, base: dict, reduction, schedule: list[float], slo_s: float, ladder_protos) -> list[dict]:
    records = []

    async def one(at: float):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        sent = time.perf_counter() - t0
        try:
            reply = await stub.Generate(pb.GenerateRequest(**base, reduction=reduction), timeout=3 * slo_s)
            latency = time.perf_counter() - t0 - sent
            level = next((i for i, p in enumerate(ladder_protos) if p == reply.applied_plan.plan), -1)
            retention = reply.usage.visual_tokens_merged / max(1, reply.usage.visual_tokens_in)
            records.append({"sent": sent, "latency": latency, "ok": True, "level": level, "retention": retention})
        except grpc.aio.AioRpcError as exc:
            records.append({"sent": sent, "latency": time.perf_counter() - t0 - sent, "ok": False,
                            "level": -1, "retention": 0.0, "code": exc.code().name})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(at) for at in schedule))
    return sorted(records, key=lambda r: r["sent"])


def summarize(records: list[dict], slo_s: float, duration: float) -> dict:
    answered = [r for r in records if r["ok"]]
    return {
        "slo_attainment": sum(r["ok"] and r["latency"] <= slo_s for r in records) / len(records),
        "mean_retention": statistics.mean(r["retention"] for r in answered) if answered else 0.0,
        "throughput_rps": len(answered) / duration,
        "requests": len(records),
        "failed": len(records) - len(answered),
        "slo_s": slo_s,
    }


def plot(results: dict, schedule, start_rate, peak_rate, ramp_s, hold_s, slo_s, ladder, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ts = [i * (ramp_s + hold_s) / 200 for i in range(201)]
    axes[0].plot(ts, [start_rate + (peak_rate - start_rate) * min(1, t / ramp_s) for t in ts], color="black")
    axes[0].set_ylabel("offered load (req/s)")
    axes[0].set_title("Load ramp: adaptive controller vs fixed policies")
    colors = {"always_full": "tab:red", "always_max_saving": "tab:blue", "adaptive": "tab:green"}
    for name, records in results.items():
        xs, ys = [], []
        for i in range(len(records)):
            # a failed request is a miss however fast it failed: count it at the client deadline (3 x SLO)
            window = [r["latency"] if r["ok"] else max(r["latency"], 3 * slo_s) for r in records[max(0, i - 19): i + 1]]
            xs.append(records[i]["sent"])
            ys.append(sorted(window)[int(0.95 * (len(window) - 1))])
        axes[1].plot(xs, ys, label=name, color=colors[name])
    axes[1].axhline(slo_s, color="black", linestyle="--", label="SLO")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("rolling p95 latency (s, last 20)")
    axes[1].legend(loc="upper left")
    adaptive = [r for r in results.get("adaptive", []) if r["ok"]]
    axes[2].scatter([r["sent"] for r in adaptive], [r["level"] for r in adaptive], s=8, color="tab:green")
    axes[2].set_yticks(range(len(ladder)), [level.name for level in ladder])
    axes[2].set_ylabel("adaptive: ladder level")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args) -> dict:
    proc, target, _ = start_server(args.model, max_queue=64, max_batch=args.max_batch,
                                   extra=["--default-slo-ms", "1000", "--feedback-interval-s", "1"])
    try:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.AimServiceStub(ch)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            ladder = default_ladder(info.num_layers, plan_from_proto(info.default_plan))  # the server's ladder
            ladder_protos = [plan_to_proto(level.plan) for level in ladder]
            base = dict(parts=[pb.ContentPart(video=pb.Video(data=sample_video(64), mime_type="video/mp4",
                                                             num_frames=args.frames)),
                               pb.ContentPart(text="Where does the red square move?")],
                        sampling=pb.SamplingParams(max_new_tokens=args.max_new_tokens))
            full = pb.Reduction(none=pb.NoReduction())
            cheapest = pb.Reduction(plan=ladder_protos[-1])
            t_full = await service_time(stub, base, full)
            t_max = await service_time(stub, base, cheapest)
            slo_s = args.slo_s or args.slo_factor * t_full
            start_rate, peak_rate = args.rates or (0.3 / t_full, args.peak_utilization / t_max)
            print(f"service time: full {t_full:.3f}s, max saving {t_max:.3f}s; SLO {slo_s:.2f}s; "
                  f"load {start_rate:.2f} -> {peak_rate:.2f} req/s", flush=True)
            schedule = arrival_times(start_rate, peak_rate, args.ramp_s, args.hold_s, args.seed)
            policies = {"always_full": full, "always_max_saving": cheapest,
                        "adaptive": pb.Reduction(auto=pb.AutoBudget(latency_slo_ms=int(slo_s * 1000)))}
            policies = {name: policies[name] for name in args.policies}
            results, summary = {}, {}
            for name, reduction in policies.items():
                await asyncio.sleep(3 * slo_s)  # let the previous policy's stragglers drain
                results[name] = await run_policy(stub, base, reduction, schedule, slo_s, ladder_protos)
                summary[name] = summarize(results[name], slo_s, args.ramp_s + args.hold_s)
                print(name, json.dumps(summary[name]), flush=True)
            peak_part = {name: summarize([r for r in recs if r["sent"] > args.ramp_s], slo_s, args.hold_s)
                         for name, recs in results.items()}
            plot(results, schedule, start_rate, peak_rate, args.ramp_s, args.hold_s, slo_s, ladder, args.plot_out)
            return {"summary": summary, "peak": peak_part,
                    "setting": {"model": Path(args.model).name, "frames": args.frames, "t_full_s": t_full,
                                "t_max_saving_s": t_max, "slo_s": slo_s, "start_rps": start_rate,
                                "peak_rps": peak_rate, "ramp_s": args.ramp_s, "hold_s": args.hold_s,
                                "requests": len(schedule)}}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/tiny-llava-onevision"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--ramp-s", type=float, default=60.0)
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor x full-model service time")
    parser.add_argument("--peak-utilization", type=float, default=0.75, help="peak load / max-saving capacity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", type=float, nargs=2, metavar=("START", "PEAK"),
                        help="fixed arrival rates, req/s (default: from the measured service times); with --slo-s, "
                             "for comparing builds under one load")
    parser.add_argument("--slo-s", type=float, help="fixed SLO, seconds (default: --slo-factor x full service time)")
    parser.add_argument("--policies", nargs="+", default=["always_full", "always_max_saving", "adaptive"],
                        choices=["always_full", "always_max_saving", "adaptive"])
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (1 = one at a time)")
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/controller.json"))
    parser.add_argument("--plot-out", type=Path, default=ROOT / "docs/controller-ramp.png")
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    rows = [{"policy": name, **values} for name, values in out["summary"].items()]
    for row in rows:
        row["peak_slo_attainment"] = out["peak"][row["policy"]]["slo_attainment"]
        row["setting"] = out["setting"]
    Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| policy | within SLO (all) | within SLO (peak) | mean retention | throughput req/s | failed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {100 * r['slo_attainment']:.1f}% | {100 * r['peak_slo_attainment']:.1f}% | "
              f"{r['mean_retention']:.3f} | {r['throughput_rps']:.2f} | {r['failed']} |")
    print(f"wrote {args.json_out} and {args.plot_out}")


if __name__ == "__main__":
    main()
