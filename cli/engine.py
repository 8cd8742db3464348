"""The engine alone, in this process (no server): ask, build-tiny, sample-media."""

from __future__ import annotations

from pathlib import Path

from aim_engine.plan import ReductionPlan

from .flags import choose_plan, engine_flags, number, reduction_flags, request_flags
from .output import print_json, print_summary

TINY_FAMILIES = ("llava_onevision", "llava", "llava_dinov2", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                 "qwen3_vl_moe", "internvl", "internvl_qwen3", "gemma3")  # aim_engine.tiny.BUILDERS' keys (no torch)


def load_engine(args):
    import torch

    from aim_engine.engine import AimEngine

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return AimEngine.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))


def cmd_ask(args) -> int:
    """The engine in this process, no server: prints what `generate` / `stream` print."""
    from aim_engine.generation import SamplingParams
    from aim_engine.mime import sniff_mime_type
    from aim_engine.request import GenerationRequest, GenerationResult, ImagePart, TextPart, VideoPart
    from service.convert import response_to_proto
    from service.types import AppliedPlan, Finished

    engine = load_engine(args)
    kind, plan = choose_plan(args, engine.default_plan, auto=False)
    applied = {"none": AppliedPlan(ReductionPlan(), "none", "the request asked for no reduction"),
               "explicit": AppliedPlan(plan, "explicit", "the request's plan"),
               "default": AppliedPlan(plan, "explicit", "the model's default plan")}[kind]
    parts = []
    for path in args.image:
        data = path.read_bytes()
        parts.append(ImagePart(data=data, mime_type=sniff_mime_type(data)))
    for path in args.video:
        data = path.read_bytes()
        parts.append(VideoPart(data=data, mime_type=sniff_mime_type(data), num_frames=args.frames))
    parts.append(TextPart(args.prompt))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed, stop=tuple(args.stop))
    result = None
    for event in engine.stream(GenerationRequest(parts, sampling, system=args.system or None), applied.plan):
        if isinstance(event, GenerationResult):
            result = event
        elif not args.json:
            print(event.text, end="", flush=True)
    t = result.stats.timings
    response = response_to_proto(Path(args.model).name, Finished(result, applied, queue_s=0.0, media_s=t.media_s,
                                                                 total_s=t.total_s))
    if args.json:
        print_json(response)
    else:
        print()
        print_summary(response)
    return 0


def cmd_build_tiny(args) -> int:
    from aim_engine.tiny import BUILDERS

    kwargs = {"layers": args.layers, "hidden": args.hidden}
    if args.family.startswith("llava"):
        kwargs["image_size"] = args.image_size
    print(BUILDERS[args.family](args.out, **kwargs))
    return 0


def cmd_sample_media(args) -> int:
    from reference_model.samples import write_samples

    for path in write_samples(Path(args.out), args.seed):
        print(path)
    return 0


def add_commands(command) -> None:
    ask = command("ask", cmd_ask, "ask a question about images / videos with the engine in this process (no server)",
                  extra="server")
    engine_flags(ask)
    request_flags(ask, client=False)
    reduction_flags(ask, auto=False)

    tiny = command("build-tiny", cmd_build_tiny, "write a tiny random checkpoint (tests, demos, timing)",
                   extra="server")
    tiny.add_argument("--family", choices=sorted(TINY_FAMILIES), default="llava_onevision", help="model family")
    tiny.add_argument("--layers", type=number(int, 1), default=4, help="LLM layers")
    tiny.add_argument("--hidden", type=number(int, 8), default=64, help="LLM hidden size (a multiple of 8)")
    tiny.add_argument("--image-size", type=number(int, 1), default=64, help="vision input side, pixels (LLaVA "
                                                                              "families)")
    tiny.add_argument("--out", required=True, metavar="DIR", help="where to write it")

    media = command("sample-media", cmd_sample_media,
                    "write a synthetic scene (PNG) and clip (MP4) of the reference model's world, with Q&A",
                    extra="server")
    media.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    media.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
