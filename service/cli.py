"""aim-serve: serve multimodal LLMs over gRPC with AIM token reduction, call them, and work with the engine alone.

  serving        serve
  client         generate, stream, estimate, info, health   (gRPC only: these never load torch)
  engine alone   ask, build-tiny, sample-media
  reference      build-reference, train-reference, eval, calibrate

`aim-serve COMMAND --help` lists a command's flags with their defaults and units."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from aim_engine.errors import Cancelled, EngineError, ModelLoadError
from aim_engine.plan import (IMPORTANCE_METHODS, POSITION_RULES, PRE_LLM_METHODS, PlanError, ReductionPlan,
                             parse_prune_stages)
from controller.policy import PRIORITIES

from .settings import Settings

DTYPES = ("float32", "bfloat16", "float16")
TINY_FAMILIES = ("llava_onevision", "llava", "llava_dinov2", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                 "qwen3_vl_moe", "internvl", "internvl_qwen3", "gemma3")  # aim_engine.tiny.BUILDERS' keys (without importing torch)
# the extra (pyproject.toml) that brings a module the client install lacks
_EXTRA_OF = {**dict.fromkeys(("torch", "transformers", "safetensors", "numpy", "PIL", "av", "grpc_reflection",
                              "prometheus_client", "pynvml", "fastapi", "uvicorn"), "server"),
             **dict.fromkeys(("gguf", "onnx", "accelerate", "tqdm", "matplotlib", "reference_model", "evaluation"),
                             "reference")}  # the last two: this project's, absent from the server images


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag and the value, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """Shows every flag's default, except where there is none to show or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "%(default)" in text or "(default" in text
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


# ---- argument types: a bad value names its flag (argparse adds it) and the value --------------------------------
def readable_file(text: str) -> Path:
    try:
        with open(text, "rb"):
            return Path(text)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"no such file: {text!r}") from None
    except IsADirectoryError:
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror}") from None


def _number(kind, low=None, high=None, low_open=False, what=""):
    """A type for argparse: `kind` (int or float), finite, within [low, high] ((low, high] if low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        bad = (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and value > high))
        if bad:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {' and '.join(filter(None, (lo, hi)))}"
                                             + (f" ({what})" if what else ""))
        return value
    parse.__name__ = kind.__name__
    return parse


def _prune_stages(text: str) -> tuple[tuple[int, float], ...]:
    try:
        return parse_prune_stages(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:KEEP/LAYER:KEEP/..., e.g. 2:0.5/4:0.25") from None


UINT32 = 2**32 - 1


# ---- the flags shared by several commands -----------------------------------------------------------------------
def _reducer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRE_LLM_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected reducers of {', '.join(PRE_LLM_METHODS)}, comma-separated")
    return names


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """An explicit plan, one flag per ReductionPlan field. How much to reduce comes from the merge and prune flags;
    how (ranking, reducer, positions, attention) starts from the model's default plan unless a flag says otherwise."""
    g = p.add_argument_group("an explicit plan", "Any merge or prune flag gives an exact plan. The ranking, reducer, "
                             "position and attention rules not given are the model's default plan's.")
    g.add_argument("--merge-tokens", type=_number(int, 1, UINT32), metavar="N",
                   help="visual tokens kept per frame / image crop by merging")
    g.add_argument("--merge-retention", type=_number(float, 0, 1, low_open=True), metavar="R",
                   help="share of each frame's / crop's visual tokens kept by merging, (0, 1]")
    g.add_argument("--prune", type=_number(int, 1, UINT32), nargs=2, metavar=("L1", "L2"),
                   help="progressive pruning: from layer L1 fewer visual tokens each layer, none left at L2")
    g.add_argument("--prune-stages", type=_prune_stages, metavar="L:KEEP/...",
                   help="staged pruning instead of --prune: from layer L on, KEEP of the merged visual tokens "
                        "remain, e.g. 2:0.5/4:0.25 (FastV, PyramidDrop)")
    g.add_argument("--importance", choices=IMPORTANCE_METHODS, help="ranking of visual tokens for pruning")
    g.add_argument("--reducer", choices=PRE_LLM_METHODS, help="how the merge target is reached before the LLM")
    g.add_argument("--positions", choices=POSITION_RULES,
                   help="positions of merge survivors (1-D RoPE models; M-RoPE models keep their own)")
    g.add_argument("--proportional-attention", action=argparse.BooleanOptionalAction,
                   help="merged tokens draw attention by how many tokens they stand for")
    g.add_argument("--merge-pruned", action=argparse.BooleanOptionalAction,
                   help="tokens pruned inside the LLM are averaged into their most similar kept token (HoliTom)")


_HOW_FLAGS = ("importance", "reducer", "positions", "proportional_attention", "merge_pruned")


def plan_from_flags(args, model_default) -> ReductionPlan | None:
    """The explicit plan the flags give, or None when they give none. `model_default` is called, only when needed,
    for the model's default plan, whose rules fill the ones not given."""
    if not (args.merge_tokens or args.merge_retention or args.prune or args.prune_stages):
        given = [f"--{name.replace('_', '-')}" for name in _HOW_FLAGS if getattr(args, name) is not None]
        if given:
            raise PlanError(f"{', '.join(given)} only say how to reduce: add --merge-tokens, --merge-retention, "
                            "--prune or --prune-stages to say how much")
        return None
    rules = {name: getattr(args, name) for name in _HOW_FLAGS}
    if any(value is None for value in rules.values()):
        base = model_default()
        rules = {name: getattr(base, name) if value is None else value for name, value in rules.items()}
    prune = args.prune or (None, None)
    return ReductionPlan(merge_tokens=args.merge_tokens, merge_retention=args.merge_retention,
                         prune_start=prune[0], prune_end=prune[1], prune_stages=args.prune_stages or (), **rules)


def _reduction_flags(p: argparse.ArgumentParser, auto: bool) -> None:
    g = p.add_argument_group("reduction", "Without these flags: " + (
        "auto, the server picks the plan for the latency target." if auto else "the model's default plan."))
    g.add_argument("--none", action="store_true", help="the untouched model: no merging, no pruning")
    g.add_argument("--aim-default", action="store_true", help="the model's default AIM plan: its calibrated plan "
                   "file (the reference model's merges alone, no pruning), else the paper's merging and progressive "
                   "pruning for its depth; `aim-serve info` shows it" + ("" if auto else " (what no flag gives)"))
    if auto:
        g.add_argument("--slo-ms", type=_number(int, 0, UINT32), default=0, metavar="MS",
                       help="auto: latency target of the whole request, ms (default: 0 = the server's, "
                            "--default-slo-ms)")
        g.add_argument("--min-retention", type=_number(float, 0, 1), default=0.0, metavar="R",
                       help="auto: the least share of visual tokens merging may keep, [0, 1]")
        g.add_argument("--priority", choices=PRIORITIES,
                       help="auto: low is reduced first under load, high last (default: normal)")
    add_plan_flags(p)


def _request_flags(p: argparse.ArgumentParser, client: bool) -> None:
    def server(setting: str) -> str:
        return f" (default: 0 = the server's, {setting})" if client else ""

    p.add_argument("--prompt", required=not client, default="Describe it." if client else None, metavar="TEXT",
                   help="the question or instruction")
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (default: the model's chat template's)")
    p.add_argument("--image", type=readable_file, action="append", default=[], metavar="FILE",
                   help="an image (PNG, JPEG, WebP, GIF); repeatable, in order before the prompt")
    p.add_argument("--video", type=readable_file, action="append", default=[], metavar="FILE",
                   help="a video (MP4, WebM, MKV, MOV, AVI); repeatable")
    p.add_argument("--frames", type=_number(int, 0 if client else 1, UINT32), default=0 if client else 8,
                   metavar="N", help="frames sampled uniformly from each video" + server("--default-frames"))
    p.add_argument("--max-new-tokens", type=_number(int, 0 if client else 1, UINT32), default=0 if client else 64,
                   metavar="N", help="most tokens to generate" + server("--default-max-new-tokens"))
    p.add_argument("--temperature", type=_number(float, 0), default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=_number(float, 0, 1), default=0.0 if client else 1.0, metavar="P",
                   help="nucleus sampling mass, [0, 1]; " + ("0 or 1 = off" if client else "1 = off"))
    p.add_argument("--seed", type=_number(int, 0, 2**64 - 1), metavar="N", help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer at TEXT; repeatable")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON (stream: one object a line)")


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the server's address")
    p.add_argument("--token", help="bearer token, when the server has --auth-token")
    p.add_argument("--tls-ca", type=readable_file, metavar="PEM", help="root certificate to verify a TLS server")
    p.add_argument("--timeout", type=_number(float, 0, low_open=True), metavar="S",
                   help="deadline of the call, seconds (default: none)")
    p.add_argument("--model", default="", metavar="NAME", help="served model (default: the server's first)")


def _engine_flags(p: argparse.ArgumentParser, model_help: str = "local checkpoint directory") -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=model_help)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")


# ---- output -------------------------------------------------------------------------------------------------------
def _as_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_json(message) -> None:
    print(json.dumps(_as_dict(message), ensure_ascii=False))


def _plan_line(applied) -> str:
    from .plan_proto import plan_from_proto
    from .proto.aim.v1 import aim_service_pb2 as pb

    source = pb.PlanSource.Name(applied.source).removeprefix("PLAN_SOURCE_").lower()
    return f"plan: {plan_from_proto(applied.plan).describe()} ({source}: {applied.reason})"


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.3g} GFLOPs"


def _prefill_line(prefill: float, baseline: float) -> str:
    if prefill >= baseline:
        return f"LLM prefill: {_gflops(prefill)}, nothing saved"
    ratio = f"{baseline / prefill:.1f}x fewer FLOPs, " if prefill else ""
    saved = 100 * (1 - prefill / baseline)
    return f"LLM prefill: {ratio}{saved:.1f}% saved ({_gflops(prefill)} of {_gflops(baseline)})"


def summary_lines(response) -> list[str]:
    """A GenerateResponse as a few lines a person reads: what was reduced, what it saved, where time went."""
    from .proto.aim.v1 import aim_service_pb2 as pb

    u, c, t = response.usage, response.cost, response.timings
    last = u.visual_tokens_per_layer[-1] if u.visual_tokens_per_layer else u.visual_tokens_merged
    ms = lambda s: f"{1e3 * s:.0f}"  # noqa: E731
    return [
        f"[{pb.FinishReason.Name(response.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
        + _plan_line(response.applied_plan),
        f"visual tokens: {u.visual_tokens_in} in -> {u.visual_tokens_merged} after merging -> {last} at the last "
        "layer",
        f"{_prefill_line(c.prefill_flops, c.baseline_prefill_flops)}; vision encoder {_gflops(c.vision_flops)} "
        f"(not reduced)",
        f"tokens: prompt {u.prompt_tokens}, answer {u.completion_tokens}; KV cache {c.kv_cache_bytes / 1024:.0f} KiB"
        + (f"; feature cache: {u.feature_cache_hits} of {u.feature_cache_hits + u.feature_cache_misses} media "
           f"reused ({ms(t.vision_seconds_saved)} ms of vision saved)" if u.feature_cache_hits else "")
        + (f"; {u.prefix_tokens_reused} prompt tokens from a cached prefix" if u.prefix_tokens_reused else ""),
        f"time (ms): queue {ms(t.queue_seconds)}, media {ms(t.media_seconds)}, vision {ms(t.vision_seconds)}, "
        f"prefill {ms(t.prefill_seconds)}, first token {ms(t.time_to_first_token_seconds)}, decode "
        f"{ms(t.decode_seconds)}, total {ms(t.total_seconds)}",
    ]


def _print_summary(response) -> None:
    print("\n".join(["", *summary_lines(response)]))


# ---- client commands (grpc and the stubs only) -------------------------------------------------------------------
def _client(args):
    from .client import AimClient

    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    return AimClient(args.target, token=args.token, root_certificates=ca, timeout=args.timeout)


def _only_for_auto(args) -> None:
    given = [flag for flag, value in (("--slo-ms", args.slo_ms), ("--min-retention", args.min_retention),
                                      ("--priority", args.priority)) if value]
    if given:
        raise PlanError(f"{', '.join(given)} only apply to auto requests, not with --none, --aim-default or an "
                        "explicit plan")


def _request_kwargs(args, client=None) -> dict:
    from .plan_proto import plan_from_proto

    model_default = lambda: plan_from_proto(client.model_info(args.model).default_plan)  # noqa: E731
    explicit = plan_from_flags(args, model_default)
    if sum(map(bool, (args.none, args.aim_default, explicit))) > 1:
        raise PlanError("give one of --none, --aim-default or an explicit plan's flags")
    plan = model_default() if args.aim_default else explicit
    if plan is not None or args.none:
        _only_for_auto(args)
    return dict(images=args.image, videos=args.video, frames=args.frames, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos, plan=plan, no_reduction=args.none, slo_ms=args.slo_ms,
                min_retention=args.min_retention, priority=args.priority, model=args.model,
                system_prompt=args.system)


def cmd_generate(args) -> int:
    with _client(args) as client:
        response = client.generate(args.prompt, **_request_kwargs(args, client))
    if args.json:
        _print_json(response)
    else:
        print(response.text)
        _print_summary(response)
    return 0


def cmd_stream(args) -> int:
    with _client(args) as client:
        events = client.stream_events(args.prompt, **_request_kwargs(args, client))
        for event in events:
            if args.json:
                _print_json(event)
            elif event.HasField("result"):
                print()
                _print_summary(event.result)
            else:
                print(event.text_delta, end="", flush=True)
    return 0


def cmd_estimate(args) -> int:
    with _client(args) as client:
        est = client.estimate(args.prompt, **_request_kwargs(args, client))
    if args.json:
        _print_json(est)
        return 0
    print(_plan_line(est.applied_plan))
    print(f"visual tokens: {est.visual_tokens_in} in -> {est.visual_tokens_merged} after merging")
    print(_prefill_line(est.prefill_flops, est.baseline_prefill_flops))
    print(f"predicted latency: {1e3 * est.predicted_latency_seconds:.0f} ms (queue included)")
    return 0


def cmd_info(args) -> int:
    from .plan_proto import plan_from_proto

    with _client(args) as client:
        info = client.model_info(args.model)
    if args.json:
        _print_json(info)
        return 0
    default = plan_from_proto(info.default_plan)
    pruning = "with progressive pruning" if default.prune_start or default.prune_stages else "merging only, no pruning"
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    lim = info.limits
    print(f"model: {info.model} ({info.family}, {info.num_layers} layers, hidden {info.hidden_size}, "
          f"video {'yes' if info.supports_video else 'no'})")
    print(f"default plan: {default.describe()} ({pruning})")
    print(f"limits: {mib(lim.max_media_bytes)} a media item, {lim.max_pixels} pixels an image or frame, "
          f"{lim.max_frames} frames a video, {lim.max_new_tokens} new tokens, {mib(lim.max_message_bytes)} a message")
    print(f"served models: {', '.join(info.served_models)}")
    return 0


def cmd_health(args) -> int:
    """grpc.health.v1 Check: exit 0 when SERVING (container health checks; no grpc_health_probe needed)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                          timeout=args.timeout)
    if args.json:
        _print_json(reply)
    else:
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# ---- the server ---------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import asyncio
    import logging

    settings = Settings.from_args(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import serve

    asyncio.run(serve(settings))
    return 0


# ---- the engine alone -----------------------------------------------------------------------------------------------
def _load_engine(args):
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

    from .convert import response_to_proto
    from .types import AppliedPlan, Finished

    engine = _load_engine(args)
    if args.none and (args.aim_default or plan_from_flags(args, engine.default_plan)):
        raise PlanError("give one of --none, --aim-default or an explicit plan's flags")
    explicit = None if args.none or args.aim_default else plan_from_flags(args, engine.default_plan)
    if args.none:
        applied = AppliedPlan(ReductionPlan(), "none", "the request asked for no reduction")
    elif explicit is not None:
        applied = AppliedPlan(explicit, "explicit", "the request's plan")
    else:
        applied = AppliedPlan(engine.default_plan(), "explicit", "the model's default plan")
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
        _print_json(response)
    else:
        print()
        _print_summary(response)
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


# ---- the reference model and evaluation ------------------------------------------------------------------------------
def cmd_build_reference(args) -> int:
    from reference_model.assemble import assemble

    print(assemble(Path(args.out), force=args.force))
    return 0


def cmd_train_reference(args) -> int:
    from reference_model.assemble import build_base
    from reference_model.train import TRIED_STAGES, Trainer, TrainConfig

    base = Path(args.base)
    if not (base / "config.json").is_file():
        model, _, processor = build_base(seed=args.seed)
        model.save_pretrained(base)
        processor.save_pretrained(base)
    config = TrainConfig(seed=args.seed)
    for name in args.then:
        if name not in TRIED_STAGES:
            raise ValueError(f"--then {name!r}: no such tried stage; there are {', '.join(sorted(TRIED_STAGES))}")
        config = config.then(TRIED_STAGES[name])
    trainer = Trainer(base, Path(args.run), config, threads=args.threads)
    trainer.train(until_step=args.until_step)
    trainer.export(Path(args.product) if args.product else None)
    print(f"trained to step {trainer.step}/{trainer.config.total_steps}; product written")
    return 0


def cmd_eval(args) -> int:
    import shlex

    from tqdm import tqdm

    from aim_engine.methods import METHODS
    from evaluation.datasets import load_dataset
    from evaluation.report import markdown, write
    from evaluation.runner import build_specs, custom_plan, evaluate, model_identity

    methods = [m for m in args.methods.split(",") if m]
    sweep = methods if args.sweep is None else [m for m in args.sweep.split(",") if m]
    unknown = [m for m in methods + sweep if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods/--sweep: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    custom = {}
    for text in args.plan:
        label, sep, spec = text.partition(":")
        if not sep or not label.strip():
            raise ValueError(f"--plan {text!r}: expected LABEL:key=value,... (or LABEL:default,key=value,...)")
        custom_plan(spec, ReductionPlan())  # a bad plan fails before the model loads
        custom[label.strip()] = spec
    engine = _load_engine(args)
    dataset = load_dataset(args.dataset, seed=args.seed).for_family(engine.adapter.supports_video)
    specs = build_specs(engine, dataset, methods, sweep=sweep, match=not args.no_match, custom=custom)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(specs) * len(dataset.items), desc=f"eval {dataset.name}", unit="q",
              disable=not sys.stderr.isatty()) as bar:
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
    from tqdm import tqdm

    from aim_engine.plan import PLAN_FILE
    from evaluation.calibrate import calibrate, write_plan_file
    from evaluation.datasets import load_dataset

    engine = _load_engine(args)
    dataset = load_dataset(args.dataset, seed=args.seed).for_family(engine.adapter.supports_video)
    with tqdm(desc=f"calibrate on {dataset.name}", unit="q", disable=not sys.stderr.isatty()) as bar:
        content = calibrate(engine, dataset, args.target_ratio, on_item=bar.update, reducers=tuple(args.reducers))
    table = content["calibration"]
    print(f"target: {table['target_flops_ratio']:.2f}x fewer LLM prefill FLOPs (the paper default's)")
    for c in table["candidates"]:
        acc = "unreachable" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}%"
        print(f"  {acc:>11}  {c['flops_ratio']:.2f}x  {c['label']}")
    path = write_plan_file(content, Path(args.out) if args.out else Path(args.model) / PLAN_FILE)
    print(f"default plan: {content['describe']} ({table['chosen']}) -> {path}")
    return 0


# ---- the parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aim-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, description: str | None = None, extra: str | None = None):
        """`extra`: what the command needs beyond the client install (pyproject.toml's optional dependencies)."""
        p = sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)
        p.set_defaults(func=func, extra=extra)
        return p

    serve = command("serve", cmd_serve, "run the gRPC server",
                    "Serve local checkpoints over gRPC. Each flag also reads from AIM_<NAME> and from a --config file; "
                    "a flag wins over the environment, which wins over the file.", extra="server")
    Settings.argument_parser(serve)

    for name, func, text in (("generate", cmd_generate, "one request; prints the answer and a summary"),
                             ("stream", cmd_stream, "one request; prints the answer as it comes, then a summary"),
                             ("estimate", cmd_estimate, "predict a request's plan, FLOPs and latency; nothing runs")):
        p = command(name, func, text)
        _client_flags(p)
        _request_flags(p, client=True)
        p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens (benchmarks)")
        _reduction_flags(p, auto=True)

    info = command("info", cmd_info, "describe a served model: family, depth, default plan, limits")
    _client_flags(info)
    info.add_argument("--json", action="store_true", help="print the whole response as JSON")

    health = command("health", cmd_health, "exit 0 if the server reports SERVING (container health checks)")
    health.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the server's address")
    health.add_argument("--service", default="", help="service name; empty = the whole server")
    health.add_argument("--timeout", type=_number(float, 0, low_open=True), default=5.0, metavar="S",
                        help="deadline, seconds")
    health.add_argument("--json", action="store_true", help="print the whole response as JSON")

    ask = command("ask", cmd_ask, "ask a question about images / videos with the engine in this process (no server)",
                  extra="server")
    _engine_flags(ask)
    _request_flags(ask, client=False)
    _reduction_flags(ask, auto=False)

    tiny = command("build-tiny", cmd_build_tiny, "write a tiny random checkpoint (tests, demos, timing)",
                   extra="server")
    tiny.add_argument("--family", choices=sorted(TINY_FAMILIES), default="llava_onevision", help="model family")
    tiny.add_argument("--layers", type=_number(int, 1), default=4, help="LLM layers")
    tiny.add_argument("--hidden", type=_number(int, 8), default=64, help="LLM hidden size (a multiple of 8)")
    tiny.add_argument("--image-size", type=_number(int, 1), default=64, help="vision input side, pixels (LLaVA "
                                                                               "families)")
    tiny.add_argument("--out", required=True, metavar="DIR", help="where to write it")

    media = command("sample-media", cmd_sample_media,
                    "write a synthetic scene (PNG) and clip (MP4) of the reference model's world, with Q&A",
                    extra="server")
    media.add_argument("--out", required=True, metavar="DIR", help="where to write them")
    media.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")

    build = command("build-reference", cmd_build_reference,
                    "assemble the reference VLM from the packaged weights and the committed product",
                    extra="reference")
    build.add_argument("--out", default="models/aim-reference", metavar="DIR", help="where to write it")
    build.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")

    train = command("train-reference", cmd_train_reference, "train the reference VLM's projector and LoRA (resumable)",
                    extra="reference")
    train.add_argument("--base", default="models/reference-base", metavar="DIR",
                       help="untrained checkpoint (built if missing)")
    train.add_argument("--run", default="runs/reference", metavar="DIR", help="checkpoints and loss history")
    train.add_argument("--until-step", type=_number(int, 1), metavar="N",
                       help="stop after this step (resume later from the checkpoint; default: to the end)")
    train.add_argument("--product", metavar="DIR", help="where to write the product (default: the package's product/)")
    train.add_argument("--seed", type=int, default=0, help="training seed")
    train.add_argument("--threads", type=_number(int, 1), metavar="N", help="CPU threads (default: torch's)")
    train.add_argument("--then", action="append", default=[], metavar="STAGE",
                       help="after the product's stages, also run this stage that was tried and not adopted "
                            "(reference_model/train.py TRIED_STAGES: D, E, F; docs/fidelity.md); repeatable")

    ev = command("eval", cmd_eval, "accuracy against LLM FLOPs of plans and methods on a dataset", extra="reference")
    _engine_flags(ev)
    ev.add_argument("--dataset", default="synthetic:100",
                    help="synthetic[:N per type] (the seeded test split; synthetic-val[:N] the validation split) or "
                         "a .jsonl file of multiple-choice items (default: synthetic:100)")
    ev.add_argument("--methods", default="aim,fastv,pdrop,evs,pool", help="comma-separated method names")
    ev.add_argument("--sweep", help="methods whose knob sweep runs, comma-separated; '' for none (default: all of "
                                    "--methods)")
    ev.add_argument("--no-match", action="store_true", help="skip the peers matched to AIM-default FLOPs")
    ev.add_argument("--plan", action="append", default=[], metavar="LABEL:SPEC",
                    help="also run a custom plan (repeatable); SPEC is key=value,... over the plan's fields, "
                         "e.g. 'merge only:merge_retention=0.25' or 'late:default,prune_start=22,prune_end=30'; "
                         "merge_retention=match: the retention at which it costs AIM-default's FLOPs")
    ev.add_argument("--out", default="eval/fidelity", metavar="PREFIX",
                    help="writes PREFIX.md, .json, .png and .answers.jsonl (every answer; a run of the same "
                         "checkpoint content, device and dtype resumes from it) (default: eval/fidelity)")
    ev.add_argument("--seed", type=int, default=0, help="dataset seed")
    ev.add_argument("--threads", type=_number(int, 1), metavar="N", help="CPU threads (default: torch's)")
    ev.add_argument("--command-line", help=argparse.SUPPRESS)

    cal = command("calibrate", cmd_calibrate, "choose the model's own default plan on held-out data (the paper "
                  "default's FLOPs, best accuracy) and write it into the checkpoint", extra="reference")
    _engine_flags(cal)
    cal.add_argument("--dataset", default="synthetic-val:15",
                     help="held-out data: synthetic-val[:N per type] or a .jsonl file, not the test set "
                          "(default: synthetic-val:15)")
    cal.add_argument("--target-ratio", type=_number(float, 1), metavar="X",
                     help="LLM prefill FLOPs reduction to hold (default: the paper default plan's on this data)")
    cal.add_argument("--reducers", type=_reducer_list, default=["merge"], metavar="R,...",
                     help="pre-LLM reducers to try, each alone and under each prune range, e.g. merge,vidcom2,holitom "
                          f"(of {', '.join(PRE_LLM_METHODS)}; default: merge)")
    cal.add_argument("--out", metavar="FILE", help="where to write the plan file (default: MODEL/aim-plan.json)")
    cal.add_argument("--seed", type=int, default=0, help="dataset seed")
    cal.add_argument("--threads", type=_number(int, 1), metavar="N", help="CPU threads (default: torch's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        # a log file or a pipe: no progress bars in it (tqdm's own, and transformers' and the Hub's, which read
        # this when they are first imported)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        if module not in _EXTRA_OF:
            raise
        extra = "reference" if "reference" in (_EXTRA_OF[module], args.extra) else "server"
        print(f"error: `aim-serve {args.command}` needs {exc.name}, which this install lacks: "
              f"pip install 'aim-serve[{extra}]'", file=sys.stderr)
        return 2
    except (EngineError, ModelLoadError, Cancelled, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
