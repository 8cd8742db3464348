"""Command line: `aim-serve ask` asks a question about images / a video with a chosen plan and prints the
streamed answer and the request's stats; `aim-serve build-tiny` writes a tiny random checkpoint of a family."""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from dataclasses import asdict
from pathlib import Path

from .errors import EngineError, ModelLoadError
from .generation import SamplingParams
from .plan import IMPORTANCE_METHODS, POSITION_RULES, PRE_LLM_METHODS, ReductionPlan, parse_prune_stages

mimetypes.add_type("image/webp", ".webp")
mimetypes.add_type("video/webm", ".webm")
mimetypes.add_type("video/x-matroska", ".mkv")


def prune_stages(text: str) -> tuple[tuple[int, float], ...]:  # argparse names the type by this function
    return parse_prune_stages(text)


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """The flags of an explicit plan, one per ReductionPlan field; every command line that takes a plan uses
    these (and plan_from_flags)."""
    p.add_argument("--merge-tokens", type=int, help="tokens per frame / image crop after merging")
    p.add_argument("--merge-retention", type=float, help="share of each frame's tokens kept by merging")
    p.add_argument("--prune", type=int, nargs=2, metavar=("L1", "L2"), help="prune progressively from L1 to L2")
    p.add_argument("--prune-stages", type=prune_stages, metavar="L:KEEP/...",
                   help="staged pruning instead of --prune: from layer L on, KEEP of the merged visual tokens "
                        "remain, e.g. 2:0.5/4:0.25 (FastV, PDrop)")
    p.add_argument("--importance", choices=IMPORTANCE_METHODS, default="pagerank", help="ranking for pruning")
    p.add_argument("--reducer", choices=PRE_LLM_METHODS, default="merge",
                   help="how the merge target is reached before the LLM")
    p.add_argument("--positions", choices=POSITION_RULES, default="consecutive",
                   help="merge survivors' positions (1-D RoPE models)")
    p.add_argument("--proportional-attention", action="store_true",
                   help="merged tokens draw attention by how many tokens they stand for")


def plan_flags_given(args) -> bool:
    """Whether the flags ask for any reduction (the other flags only say how)."""
    return bool(args.merge_retention or args.merge_tokens or args.prune or args.prune_stages)


def plan_from_flags(args) -> ReductionPlan:
    prune = args.prune or (None, None)
    return ReductionPlan(merge_tokens=args.merge_tokens, merge_retention=args.merge_retention,
                         prune_start=prune[0], prune_end=prune[1], prune_stages=args.prune_stages or (),
                         importance=args.importance, reducer=args.reducer, positions=args.positions,
                         proportional_attention=args.proportional_attention)


def _plan_from_args(args, engine) -> ReductionPlan:
    if args.plan == "none":
        return ReductionPlan()
    if args.plan == "default":
        return engine.default_plan()
    return plan_from_flags(args)


def _mime(path: Path) -> str:
    mime, _ = mimetypes.guess_type(path.name)
    return mime or "application/octet-stream"


def cmd_ask(args) -> int:
    import torch

    from .engine import AimEngine
    from .request import GenerationRequest, GenerationResult, ImagePart, TextPart, VideoPart

    engine = AimEngine.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    parts = [ImagePart(data=Path(p).read_bytes(), mime_type=_mime(Path(p))) for p in args.image]
    if args.video:
        parts.append(VideoPart(data=Path(args.video).read_bytes(), mime_type=_mime(Path(args.video)),
                               num_frames=args.frames))
    parts.append(TextPart(args.prompt))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, stop=tuple(args.stop))
    plan = _plan_from_args(args, engine)
    result = None
    for event in engine.stream(GenerationRequest(parts, sampling, system=args.system), plan):
        if isinstance(event, GenerationResult):
            result = event
        elif not args.json:
            print(event.text, end="", flush=True)
    stats = result.stats
    if args.json:
        print(json.dumps({"text": result.text, "finish_reason": result.finish_reason, "plan": asdict(plan),
                          "stats": asdict(stats) | {"saved_fraction": stats.saved_fraction,
                                                    "retention": stats.retention}}, indent=2))
        return 0
    t = stats.timings
    print(f"\n\n[{result.finish_reason}] plan: {plan.describe()}")
    print(f"visual tokens: {stats.visual_tokens_in} in -> {stats.visual_tokens_merged} after merging; "
          f"per layer {stats.visual_tokens_per_layer}")
    print(f"LLM prefill: {stats.prefill_flops / 1e9:.3f} GFLOPs of {stats.prefill_flops_baseline / 1e9:.3f} "
          f"baseline ({100 * stats.saved_fraction:.1f}% saved); vision encoder {stats.vision_flops / 1e9:.3f} "
          f"GFLOPs (not reduced); decode {stats.decode_flops / 1e9:.3f} GFLOPs")
    print(f"tokens: prompt {stats.prompt_tokens}, completion {stats.completion_tokens}; "
          f"KV cache {stats.kv_cache_bytes / 1024:.1f} KiB")
    print(f"time: media {t.media_s * 1e3:.1f} ms, vision {t.vision_s * 1e3:.1f} ms, prefill {t.prefill_s * 1e3:.1f} ms,"
          f" first token {t.ttft_s * 1e3:.1f} ms, decode {t.decode_s * 1e3:.1f} ms, total {t.total_s * 1e3:.1f} ms")
    return 0


TINY_FAMILIES = ("llava_onevision", "llava", "llava_dinov2", "llava_next", "qwen2_vl", "qwen2_5_vl")


def cmd_build_tiny(args) -> int:
    from .tiny import BUILDERS

    kwargs = {"layers": args.layers, "hidden": args.hidden}
    if args.family.startswith("llava"):
        kwargs["image_size"] = args.image_size
    path = BUILDERS[args.family](args.out, **kwargs)
    print(path)
    return 0


def cmd_sample_media(args) -> int:
    """Writes a scene and a clip from the synthetic dataset (the reference model's world) as PNG and MP4, with
    their questions and answers in questions.json."""
    import av
    import numpy as np

    from .reference import synthetic as syn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = 10_000  # the first test-split scene past 10000 with 3-4 objects: something to count
    while syn.make_image(args.seed, "test", index).qas[0].answer not in ("3", "4"):
        index += 1
    scene = syn.make_image(args.seed, "test", index)
    scene.frames[0].save(out / "scene.png")
    clip = syn.make_video(args.seed, "test", 10_000)
    with av.open(str(out / "clip.mp4"), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=len(clip.frames))
        stream.width, stream.height, stream.pix_fmt = clip.frames[0].width, clip.frames[0].height, "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in clip.frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    qas = {"scene.png": [vars(q) for q in scene.qas], "clip.mp4": [vars(q) for q in clip.qas]}
    (out / "questions.json").write_text(json.dumps(qas, indent=2) + "\n")
    for name in ("scene.png", "clip.mp4", "questions.json"):
        print(out / name)
    return 0


def cmd_train_reference(args) -> int:
    from .reference.assemble import build_base
    from .reference.train import TRIED_STAGES, Trainer, TrainConfig

    base = Path(args.base)
    if not (base / "config.json").is_file():
        model, _, processor = build_base(seed=args.seed)
        model.save_pretrained(base)
        processor.save_pretrained(base)
    config = TrainConfig(seed=args.seed)
    for name in args.then:
        if name not in TRIED_STAGES:
            print(f"error: no tried stage {name!r}; there are {', '.join(sorted(TRIED_STAGES))}", file=sys.stderr)
            return 2
        config = config.then(TRIED_STAGES[name])
    trainer = Trainer(base, Path(args.run), config, threads=args.threads)
    trainer.train(until_step=args.until_step)
    trainer.export(Path(args.product) if args.product else None)
    print(f"trained to step {trainer.step}/{trainer.config.total_steps}; product written")
    return 0


def cmd_build_reference(args) -> int:
    from .reference.assemble import assemble

    print(assemble(Path(args.out), force=args.force))
    return 0


def cmd_eval(args) -> int:
    import shlex

    import torch
    from tqdm import tqdm

    from .engine import AimEngine
    from .evaluation.datasets import load_dataset
    from .evaluation.report import markdown, write
    from .evaluation.runner import build_specs, custom_plan, evaluate, model_identity
    from .methods import METHODS

    methods = [m for m in args.methods.split(",") if m]
    sweep = methods if args.sweep is None else [m for m in args.sweep.split(",") if m]
    unknown = [m for m in methods + sweep if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    custom = {}
    for text in args.plan:
        label, sep, spec = text.partition(":")
        if not sep or not label.strip():
            raise ValueError(f"--plan {text!r}: expected LABEL:key=value,... (or LABEL:default,key=value,...)")
        custom_plan(spec, ReductionPlan())  # a bad plan fails before the model loads
        custom[label.strip()] = spec
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = AimEngine.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    dataset = load_dataset(args.dataset, seed=args.seed)
    specs = build_specs(engine, dataset, methods, sweep=sweep, match=not args.no_match, custom=custom)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(specs) * len(dataset.items), desc=f"eval {dataset.name}", unit="q") as bar:
        results = evaluate(engine, dataset, specs, on_item=bar.update,
                           journal=out.with_name(out.name + ".answers.jsonl"),
                           model_id=model_identity(Path(args.model), args.device, args.dtype))
    command = "aim-serve eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if args.command_line is None \
        else args.command_line
    paths = write(results, out, dataset.name, Path(args.model).name, command)
    print(markdown(results))
    for path in paths:
        print(path)
    return 0


def cmd_calibrate(args) -> int:
    import torch
    from tqdm import tqdm

    from .engine import AimEngine
    from .evaluation.calibrate import calibrate, write_plan_file
    from .evaluation.datasets import load_dataset
    from .plan import PLAN_FILE

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = AimEngine.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    dataset = load_dataset(args.dataset, seed=args.seed)
    with tqdm(desc=f"calibrate on {dataset.name}", unit="q") as bar:
        content = calibrate(engine, dataset, args.target_ratio, on_item=bar.update)
    table = content["calibration"]
    print(f"target: {table['target_flops_ratio']:.2f}x fewer LLM prefill FLOPs (the paper default's)")
    for c in table["candidates"]:
        acc = "unreachable" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}%"
        print(f"  {acc:>11}  {c['flops_ratio']:.2f}x  {c['label']}")
    path = write_plan_file(content, Path(args.out) if args.out else Path(args.model) / PLAN_FILE)
    print(f"default plan: {content['describe']} ({table['chosen']}) -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aim-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="ask a question about images / a video")
    ask.add_argument("--model", required=True, help="local checkpoint directory")
    ask.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ask.add_argument("--video", help="video file")
    ask.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from the video")
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--system")
    ask.add_argument("--plan", choices=["none", "default", "custom"], default="default",
                     help="none: untouched model; default: the paper's plan for this depth; custom: the flags below")
    add_plan_flags(ask)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--stop", action="append", default=[])
    ask.add_argument("--device", default="cpu")
    ask.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ask.set_defaults(func=cmd_ask)

    tiny = sub.add_parser("build-tiny", help="write a tiny random checkpoint (tests, demos, timing)")
    tiny.add_argument("--family", choices=sorted(TINY_FAMILIES), default="llava_onevision")
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--hidden", type=int, default=64, help="LLM hidden size (multiple of 8)")
    tiny.add_argument("--image-size", type=int, default=64, help="vision input side (LLaVA families)")
    tiny.add_argument("--out", required=True)
    tiny.set_defaults(func=cmd_build_tiny)

    train = sub.add_parser("train-reference", help="train the reference VLM's projector and LoRA (resumable)")
    train.add_argument("--base", default="models/reference-base", help="untrained checkpoint (built if missing)")
    train.add_argument("--run", default="runs/reference", help="checkpoints and loss history")
    train.add_argument("--until-step", type=int, help="stop after this step (resume later from the checkpoint)")
    train.add_argument("--product", help="where to write the product (default: the package's product/)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int)
    train.add_argument("--then", action="append", default=[], metavar="STAGE",
                       help="after the product's stages, also run this stage that was tried and not adopted "
                            "(train.TRIED_STAGES: D, E, F; docs/fidelity.md); repeatable")
    train.set_defaults(func=cmd_train_reference)

    build = sub.add_parser("build-reference", help="assemble the reference VLM from packaged weights + the product")
    build.add_argument("--out", default="models/aim-reference")
    build.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    build.set_defaults(func=cmd_build_reference)

    ev = sub.add_parser("eval", help="accuracy vs LLM FLOPs of plans / methods on a dataset")
    ev.add_argument("--model", required=True, help="local checkpoint directory")
    ev.add_argument("--dataset", default="synthetic:100",
                    help="synthetic[:N per type] (the seeded test split; synthetic-val[:N] the validation split) or "
                         "a .jsonl file of multiple-choice items")
    ev.add_argument("--methods", default="aim,fastv,pdrop,evs,pool", help="comma-separated method names")
    ev.add_argument("--sweep", help="methods whose knob sweep runs (comma-separated; default: all of --methods; "
                                    "'' for none)")
    ev.add_argument("--no-match", action="store_true", help="skip the peers matched to AIM-default FLOPs")
    ev.add_argument("--plan", action="append", default=[], metavar="LABEL:SPEC",
                    help="also run a custom plan (repeatable); SPEC is key=value,... over the plan's fields, "
                         "e.g. 'merge only:merge_retention=0.25' or 'late:default,prune_start=22,prune_end=30'")
    ev.add_argument("--out", default="eval/fidelity",
                    help="output prefix: writes .md, .json and .png, and .answers.jsonl (every answer; a run of "
                         "the same checkpoint content, device and dtype resumes from it)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--threads", type=int)
    ev.add_argument("--command-line", help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_eval)

    cal = sub.add_parser("calibrate", help="choose the model's own default plan on held-out data (same FLOPs as "
                                           "the paper default, best accuracy); writes it into the checkpoint")
    cal.add_argument("--model", required=True, help="local checkpoint directory")
    cal.add_argument("--dataset", default="synthetic-val:15",
                     help="held-out data: synthetic-val[:N per type] or a .jsonl file (not the test set)")
    cal.add_argument("--target-ratio", type=float,
                     help="FLOPs reduction to hold (default: the paper default plan's on this data)")
    cal.add_argument("--out", help="where to write the plan file (default: MODEL/aim-plan.json)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    cal.add_argument("--threads", type=int)
    cal.set_defaults(func=cmd_calibrate)

    media = sub.add_parser("sample-media", help="write a synthetic scene (PNG) and clip (MP4) with their Q&A")
    media.add_argument("--out", required=True)
    media.add_argument("--seed", type=int, default=0)
    media.set_defaults(func=cmd_sample_media)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return args.func(args)
    except (EngineError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
