"""LLM prefill benchmark: the empty plan vs AIM plans, side by side in one run.

Architectures (`--arch`), random weights built from the real config (no download): LLaVA-OneVision-0.5B
(Qwen2-0.5B + SigLIP-so400m) or -7B, Qwen3-VL-2B or -8B (ViT with DeepStack + Qwen3 LM), InternVL3-2B (InternViT,
a 448-px tile per frame, + Qwen2.5-1.5B) and Gemma-3-4B (SigLIP at 896 px per image; sliding-window layers, image
tokens attending both ways). The vision tower +
projector (+ OV's 2x2 pooling) run once on random frames; their features (and Qwen3-VL's DeepStack levels) feed
every plan, so the LLM is timed on its own and the encoder's share is reported separately. A Qwen3-VL video is
`--frames` frames at 448x448: one group of 196 tokens per temporal patch of 2 frames; its prompt is the bench's
100 text tokens around the visual block (a real prompt adds ~8 timestamp tokens per temporal patch) and its
positions are sequential on all three M-RoPE axes (what the prefill computes does not depend on their values).
All plans are timed in one process on one model, interleaved (every plan once per round, --repeats rounds after a
warm-up round), so the machine's drift falls on every plan alike; the spread over rounds is reported. Peak memory is
each plan's own: on CUDA the allocator's peak around its warm-up run, on CPU (where resident memory is not
given back) a fresh subprocess per plan. Per plan: merge time, prefill time (median), importance-scoring time,
KV-cache bytes, peak memory, FLOPs (the engine's formula), measured speedup next to the FLOPs ratio.

    python bench/engine_prefill.py                                  # CPU, OV-0.5B, 8 frames
    python bench/engine_prefill.py --arch ov-7b --frames 32 --device cuda --dtype bfloat16
    python bench/engine_prefill.py --arch qwen3-vl-2b --frames 8    # CPU
    python bench/engine_prefill.py --arch internvl3-2b --frames 8   # CPU: 8 frames, one 448-px tile each
    python bench/engine_prefill.py --arch gemma3-4b --frames 4      # CPU: 4 images (Gemma 3 takes no video)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine.decoder import ATTENTION_IMPL, LanguageModel, prefill, proportional_key_bias  # noqa: E402
from aim_engine.flops import LLMShape, prefill_flops  # noqa: E402
from aim_engine.merging import merge_groups, merged_rows  # noqa: E402
from aim_engine.plan import ReductionPlan, default_prune_range  # noqa: E402
from bench.prefill_archs import ARCHS, VISION, text_config  # noqa: E402

TEXT_BEFORE, TEXT_AFTER = 15, 85  # 100 text tokens, the paper's assumption for video

def plans_for(layers: int) -> dict[str, tuple[ReductionPlan, bool]]:
    l1, l2 = default_prune_range(layers)
    return {
        "none": (ReductionPlan(), False),
        "merge 25%": (ReductionPlan(merge_retention=0.25), False),
        "prune only (pagerank)": (ReductionPlan(prune_start=l1, prune_end=l2), False),
        "merge 25% + prune (pagerank)": (ReductionPlan.default_for_depth(layers), True),
        "merge 25% + prune (text)": (ReductionPlan.default_for_depth(layers, importance="text"), False),
        "merge 25% + prune, proportional attention": (
            dataclasses.replace(ReductionPlan.default_for_depth(layers), proportional_attention=True), False),
        "merge 12.5% + prune 25-50% depth": (
            ReductionPlan(merge_retention=0.125, prune_start=max(1, layers // 4), prune_end=layers // 2), False),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """CUDA: the allocator's peak. CPU: resident set size sampled every 2 ms, relative to the start."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, self._rss()) - self.start


def worker_vision(args) -> dict:
    """Runs the vision tower (+ projector, pooling / DeepStack mergers) on random frames; saves the features and
    their merge groups; times the encoder."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    run, flops = VISION[ARCHS[args.arch]["family"]](args, dtype)
    with torch.inference_mode():  # once: the encoder is not what AIM reduces, only its share is reported
        sync(args.device)
        t0 = time.perf_counter()
        feats, deepstack, groups = run()
        sync(args.device)
        seconds = time.perf_counter() - t0
    torch.save({"features": feats.float().cpu(), "groups": groups,
                "deepstack": None if deepstack is None else deepstack.float().cpu()}, args.features)
    return {"vision_s": seconds, "visual_tokens": int(feats.shape[0]), "vision_flops": flops}


class PlanRunner:
    """The LM with random weights, the encoder's features, and one prefill per call under a named plan."""

    def __init__(self, args):
        self.device = args.device
        dtype = getattr(torch, args.dtype)
        self.cfg = text_config(args.arch)
        self.cfg._attn_implementation = ATTENTION_IMPL
        family = ARCHS[args.arch]["family"]
        self.mrope = family == "qwen3_vl"
        self.bidirectional = family == "gemma3"  # an image's tokens attend to each other both ways
        torch.manual_seed(0)
        with torch.device(args.device):
            if family in ("qwen3_vl", "gemma3"):
                from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel
                from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

                text = (Qwen3VLTextModel if self.mrope else Gemma3TextModel)(self.cfg).to(dtype).eval()
                head = torch.nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False).to(dtype)
            else:
                from transformers import Qwen2ForCausalLM

                model = Qwen2ForCausalLM(self.cfg).to(dtype).eval()
                text, head = model.model, model.lm_head
        kinds = dict(layer_types=tuple(self.cfg.layer_types), sliding_window=self.cfg.sliding_window) \
            if family == "gemma3" else {}
        self.lm = LanguageModel(text.embed_tokens, text.layers, text.norm, text.rotary_emb, head, **kinds)
        self.plans = plans_for(self.cfg.num_hidden_layers)
        saved = torch.load(args.features)
        self.feats = saved["features"].to(args.device, dtype)
        self.deepstack = None if saved["deepstack"] is None else saved["deepstack"].to(args.device, dtype)
        self.per_group = self.feats.shape[0] // saved["groups"]
        self.groups = [torch.arange(i * self.per_group, (i + 1) * self.per_group, device=args.device)
                       for i in range(saved["groups"])]
        g = torch.Generator().manual_seed(1)
        with torch.inference_mode():
            self.text = text.embed_tokens(
                torch.randint(0, self.cfg.vocab_size, (TEXT_BEFORE + TEXT_AFTER,), generator=g).to(args.device))

    @torch.inference_mode()
    def run(self, name: str):
        """(merge seconds, prefill seconds, PrefillResult) of one prefill under plan `name`."""
        plan, _ = self.plans[name]
        device = self.device
        sync(device)
        t0 = time.perf_counter()
        merged = merge_groups(self.feats, self.groups, plan.merge_target) if plan.merges else None
        visual = merged.features if merged is not None else self.feats
        deepstack = self.deepstack
        if deepstack is not None and merged is not None:
            deepstack = merged_rows(merged, deepstack)
        sync(device)
        t1 = time.perf_counter()
        embeds = torch.cat([self.text[:TEXT_BEFORE], visual, self.text[TEXT_BEFORE:]])[None]
        is_visual = torch.zeros(embeds.shape[1], dtype=torch.bool, device=device)
        is_visual[TEXT_BEFORE:TEXT_BEFORE + visual.shape[0]] = True
        positions = torch.arange(embeds.shape[1], device=device)[None]
        if self.mrope:
            positions = positions[None].expand(3, 1, -1)
        key_bias = None
        if plan.proportional_attention and merged is not None:
            key_bias = torch.zeros(embeds.shape[1], device=device)
            key_bias[TEXT_BEFORE:TEXT_BEFORE + visual.shape[0]] = proportional_key_bias(merged.sizes)
        blocks = None
        if self.bidirectional:  # one block per image: what is left of its tokens
            kept = merged.keep if merged is not None else torch.arange(self.feats.shape[0], device=device)
            blocks = torch.full((embeds.shape[1],), -1, device=device)
            blocks[TEXT_BEFORE:TEXT_BEFORE + visual.shape[0]] = kept // self.per_group
        result = prefill(self.lm, embeds, positions, is_visual, plan, decode_capacity=1, key_bias=key_bias,
                         deepstack=deepstack, blocks=blocks)
        sync(device)
        return t1 - t0, time.perf_counter() - t1, result


def worker_plans(args) -> dict:
    """Every plan timed in one process, interleaved round by round; on CUDA also each plan's peak memory."""
    runner = PlanRunner(args)
    names = list(runner.plans)
    timed = {name: {"merge": [], "prefill": [], "scoring": []} for name in names}
    peak, last = {}, {}
    for name in names:  # warm-up round (and CUDA's per-plan peak memory)
        if args.device.startswith("cuda"):
            with PeakMemory(args.device) as mem:
                runner.run(name)
            peak[name] = mem.bytes
        else:
            runner.run(name)
    for _ in range(args.repeats):
        for name in names:
            merge_s, prefill_s, result = runner.run(name)
            timed[name]["merge"].append(merge_s)
            timed[name]["prefill"].append(prefill_s)
            timed[name]["scoring"].append(result.scoring_s)
            last[name] = result
    shape = LLMShape.from_config(runner.cfg)
    out = {}
    for name in names:
        plan, is_default = runner.plans[name]
        runs, result = timed[name], last[name]
        median = statistics.median(runs["prefill"])
        out[name] = {
            "plan": name, "plan_spec": plan.describe(), "is_default": is_default,
            "merge_s": statistics.median(runs["merge"]), "prefill_s": median,
            "scoring_s": statistics.median(runs["scoring"]), "prefill_runs_s": runs["prefill"],
            "prefill_spread": (max(runs["prefill"]) - min(runs["prefill"])) / median,
            "kv_bytes": result.cache.used_bytes(), "peak_bytes": peak.get(name),
            "flops": prefill_flops(shape, result.tokens_per_layer), "tokens_per_layer": result.tokens_per_layer,
        }
    return out


def worker_memory(args) -> dict:
    """CPU: the resident memory one plan's first prefill adds, in a fresh process (the model already loaded)."""
    runner = PlanRunner(args)
    with PeakMemory(args.device) as mem:
        runner.run(args.plan)
    return {"peak_bytes": mem.bytes}


def _results(args, rows: list[dict], vision: dict) -> list[dict]:
    """Each plan's row of docs/results/engine-prefill.json, ratios against the first plan (none)."""
    base = rows[0]
    results = []
    for r in rows:
        results.append({
            "plan": r["plan"], "plan_spec": r["plan_spec"], "is_default": r["is_default"],
            "flops_ratio": base["flops"] / r["flops"],
            "prefill_speedup": base["prefill_s"] / r["prefill_s"],
            "kv_bytes_ratio": base["kv_bytes"] / r["kv_bytes"],
            "overhead_fraction": (r["merge_s"] + r["scoring_s"]) / base["prefill_s"],
            "prefill_ms": r["prefill_s"] * 1e3, "prefill_spread": r["prefill_spread"],
            "merge_ms": r["merge_s"] * 1e3, "scoring_ms": r["scoring_s"] * 1e3,
            "llm_tflops": r["flops"] / 1e12, "kv_cache_mib": r["kv_bytes"] / 2**20,
            "peak_mem_mib": r["peak_bytes"] / 2**20, "visual_tokens_per_layer_first_last": [
                r["tokens_per_layer"][0] - TEXT_BEFORE - TEXT_AFTER, r["tokens_per_layer"][-1] - TEXT_BEFORE - TEXT_AFTER],
            "vision_encoder_ms": vision["vision_s"] * 1e3,
            "vision_share_of_baseline": vision["vision_s"] / (vision["vision_s"] + base["prefill_s"]),
            "setting": {"arch": args.arch, "frames": args.frames, "device": args.device, "dtype": args.dtype,
                        "repeats": args.repeats, "threads": torch.get_num_threads() if not args.threads else args.threads,
                        "torch": torch.__version__},
        })

    return results


def _print_table(results: list[dict], vision: dict) -> None:
    header = ("| plan | LLM TFLOPs | FLOPs ratio | prefill ms (spread) | speedup | speedup / FLOPs ratio | "
              "merge+score ms (% of base) | KV MiB | KV ratio | peak MiB |")
    print("\n" + header + "\n|" + "---|" * 10)
    for r in results:
        mark = " **(default)**" if r["is_default"] else ""
        print(f"| {r['plan']}{mark} | {r['llm_tflops']:.3f} | {r['flops_ratio']:.2f}x | {r['prefill_ms']:.0f} "
              f"({100 * r['prefill_spread']:.0f}%) | "
              f"{r['prefill_speedup']:.2f}x | {r['prefill_speedup'] / r['flops_ratio']:.2f} | "
              f"{r['merge_ms'] + r['scoring_ms']:.1f} ({100 * r['overhead_fraction']:.2f}%) | "
              f"{r['kv_cache_mib']:.1f} | {r['kv_bytes_ratio']:.2f}x | {r['peak_mem_mib']:.0f} |")
    print(f"\nvision encoder (not reduced by AIM): {vision['vision_s'] * 1e3:.0f} ms = "
          f"{100 * results[0]['vision_share_of_baseline']:.0f}% of the baseline's encoder + LLM prefill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="ov-0.5b")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/engine-prefill.json"))
    parser.add_argument("--worker", choices=["vision", "plans", "memory"])
    parser.add_argument("--plan")
    parser.add_argument("--features")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        workers = {"vision": worker_vision, "plans": worker_plans, "memory": worker_memory}
        out = workers[args.worker](args)
        print("RESULT " + json.dumps(out))
        return

    def spawn(*extra) -> dict:
        cmd = [sys.executable, __file__, "--arch", args.arch, "--frames", str(args.frames), "--device", args.device,
               "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--features", features, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"worker failed: {' '.join(extra)}\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    with tempfile.TemporaryDirectory() as tmp:
        features = str(Path(tmp) / "features.pt")
        vision = spawn("--worker", "vision")
        print(f"vision encoder: {vision['visual_tokens']} visual tokens, {vision['vision_s'] * 1e3:.0f} ms", flush=True)
        by_plan = spawn("--worker", "plans")
        rows = list(by_plan.values())
        for row in rows:
            if row["peak_bytes"] is None:  # CPU: each plan's memory in a fresh process
                row["peak_bytes"] = spawn("--worker", "memory", "--plan", row["plan"])["peak_bytes"]
            print(f"  {row['plan']}: prefill {row['prefill_s'] * 1e3:.0f} ms "
                  f"(spread {100 * row['prefill_spread']:.0f}% over {args.repeats} interleaved rounds)", flush=True)

    results = _results(args, rows, vision)
    _print_table(results, vision)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
