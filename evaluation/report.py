"""Evaluation results -> a markdown table, the JSON records (docs/results/fidelity.json) and a PNG plot of
accuracy vs LLM prefill FLOPs ratio."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import SpecResult


def records(results: list[SpecResult], dataset: str, model: str) -> list[dict]:
    """One object per method x plan: method, plan, flops_ratio (baseline / actual), accuracy,
    baseline_accuracy (the empty plan's), is_default, and the detail behind them."""
    baseline = next(r for r in results if r.spec.method == "none").accuracy
    out = []
    for r in results:
        out.append({
            "method": r.spec.method, "plan": r.spec.describe(), "label": r.spec.label,
            "knob": r.spec.knobs or None, "matched_to": r.spec.matched_to,
            "flops_ratio": round(r.flops_ratio, 4), "accuracy": round(r.accuracy, 4),
            "baseline_accuracy": round(baseline, 4), "is_default": r.spec.is_default,
            "accuracy_by_type": {k: round(v, 4) for k, v in r.accuracy_by_type().items()},
            "flops_ratio_by_kind": {k: round(v, 4) for k, v in r.flops_ratio_by_kind().items()},
            "median_latency_s": round(r.median_seconds, 4), "questions": len(r.items),
            "dataset": dataset, "model": model,
        })
    return out


def markdown(results: list[SpecResult]) -> str:
    baseline = next(r for r in results if r.spec.method == "none")
    types = list(baseline.accuracy_by_type())
    head = ["method", "plan", "FLOPs ratio", "accuracy", "of baseline", *types, "median latency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by_type = r.accuracy_by_type()
        kinds = r.flops_ratio_by_kind()
        ratio = f"{r.flops_ratio:.2f}x" + (f" ({', '.join(f'{k} {v:.2f}x' for k, v in kinds.items())})"
                                            if len(kinds) > 1 else "")
        name = f"**{r.spec.label}**" if r.spec.is_default else r.spec.label
        lines.append("| " + " | ".join([
            name, r.spec.describe(), ratio, f"{100 * r.accuracy:.1f}%",
            f"{100 * r.accuracy / baseline.accuracy:.1f}%" if baseline.accuracy else "-",
            *[f"{100 * by_type.get(t, math.nan):.1f}%" for t in types],
            f"{1000 * r.median_seconds:.0f} ms"]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[SpecResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next(r for r in results if r.spec.method == "none")
    fig, ax = plt.subplots(figsize=(11, 6))
    ax.axhline(100 * baseline.accuracy, color="grey", linestyle="--", linewidth=1, label="no reduction")
    markers = {"aim": "o", "fastv": "s", "pdrop": "^", "evs": "v", "pool": "D", "vidcom2": "P", "fastvid": "X",
               "holitom": "h"}
    customs = [r for r in results if r.spec.method == "custom"]  # unrelated plans: points, not a line
    colours = plt.get_cmap("tab20b")
    for i, r in enumerate(customs):
        ax.scatter([r.flops_ratio], [100 * r.accuracy], marker="x" if i % 2 else "+", s=70, zorder=4,
                   color=colours(i / max(1, len(customs) - 1)), label=r.spec.label)
    for method in dict.fromkeys(r.spec.method for r in results if r.spec.method not in ("none", "custom")):
        # a calibrated default is not a point of its method's knob sweep: it is starred, not joined to the line
        rows = sorted((r for r in results if r.spec.method == method and (r.spec.knobs or not r.spec.is_default)),
                      key=lambda r: r.flops_ratio)
        ax.plot([r.flops_ratio for r in rows], [100 * r.accuracy for r in rows], marker=markers.get(method, "o"),
                label="aim (the paper's plan shape)" if method == "aim" else method)
    for r in results:
        if r.spec.is_default:
            ax.scatter([r.flops_ratio], [100 * r.accuracy], s=220, marker="*", color="black", zorder=5,
                       label="AIM default")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LLM prefill FLOPs reduction (baseline / actual, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: list[SpecResult], out_prefix: Path, dataset: str, model: str, command: str) -> list[Path]:
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = out_prefix.with_suffix(".json")
    md_path = out_prefix.with_suffix(".md")
    png_path = out_prefix.with_suffix(".png")
    json_path.write_text(json.dumps(records(results, dataset, model), indent=2) + "\n")
    md_path.write_text(f"Dataset `{dataset}`, model `{model}`.\n\n`{command}`\n\n" + markdown(results))
    plot(results, png_path, f"{model} on {dataset}")
    return [md_path, json_path, png_path]
