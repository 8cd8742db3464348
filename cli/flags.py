"""The flags the commands share, their argument types (a bad value names its flag and the value), and the one
choice between no reduction, the model's default, an explicit plan and auto that every command makes."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from aim_engine.plan import (PLAN_FIELD, PLAN_FIELDS, PRE_LLM_METHODS, PlanError, ReductionPlan, parse_prune_stages,
                             plan_from_values)
from controller.policy import PRIORITIES

DTYPES = ("float32", "bfloat16", "float16")
UINT32 = 2**32 - 1


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag and the value, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Help(argparse.HelpFormatter):
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


def number(kind, low=None, high=None, low_open=False, what=""):
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


# ---- the flags shared by several commands -----------------------------------------------------------------------
def reducer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRE_LLM_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected reducers of {', '.join(PRE_LLM_METHODS)}, comma-separated")
    return names


# The argument type of each plan field on the command line (ranges as ReductionPlan checks them).
_PLAN_FLAG_TYPES = {int: number(int, 1, UINT32), float: number(float, 0, 1, low_open=True), tuple: _prune_stages}
# the fields that say how to reduce: not given, they are the model's default plan's
HOW_FIELDS = tuple(f.name for f in PLAN_FIELDS if f.role == "method")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """An explicit plan, one flag per ReductionPlan field (plan.PLAN_FIELDS: names, help and choices), except
    prune_start and prune_end, which are given together as --prune L1 L2. How much to reduce comes from the merge
    and prune flags; how (ranking, reducer, positions, attention) starts from the model's default plan unless a
    flag says otherwise."""
    g = p.add_argument_group("an explicit plan", "Any merge or prune flag gives an exact plan. The ranking, reducer, "
                             "position and attention rules not given are the model's default plan's.")
    for field in PLAN_FIELDS:
        flag = "--" + field.name.replace("_", "-")
        if field.name == "prune_start":
            g.add_argument("--prune", type=number(int, 1, UINT32), nargs=2, metavar=("L1", "L2"),
                           help=f"progressive pruning: {field.help}; L2: {PLAN_FIELD['prune_end'].help}")
        elif field.name == "prune_end":
            continue
        elif field.value_type is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=field.help.removesuffix(" (bool)"))
        elif field.choices:
            g.add_argument(flag, choices=field.choices, help=field.help.split(":")[0])
        else:
            g.add_argument(flag, type=_PLAN_FLAG_TYPES[field.value_type],
                           metavar={int: "N", float: "R", tuple: "L:KEEP/..."}[field.value_type], help=field.help)


def plan_from_flags(args, model_default) -> ReductionPlan | None:
    """The explicit plan the flags give, or None when they give none, by the plan's one rule (plan_from_values) on
    the base of the model's default rules: how much to reduce is the flags' alone, how (ranking, reducer,
    positions, attention) the flags' where given, else the model's default plan's. `model_default` is called, only
    when a rule is not given, for the model's default plan."""
    given = {name: getattr(args, name) for name in ("merge_tokens", "merge_retention", "prune_stages", *HOW_FIELDS)
             if getattr(args, name) not in (None, ())}
    if args.prune:
        given["prune_start"], given["prune_end"] = args.prune
    if not set(given) - set(HOW_FIELDS):
        if given:
            flags = [f"--{name.replace('_', '-')}" for name in HOW_FIELDS if name in given]
            raise PlanError(f"{', '.join(flags)} only say how to reduce: add --merge-tokens, --merge-retention, "
                            "--prune or --prune-stages to say how much")
        return None
    rules = ReductionPlan()
    if any(name not in given for name in HOW_FIELDS):
        default = model_default()
        rules = ReductionPlan(**{name: getattr(default, name) for name in HOW_FIELDS})
    return plan_from_values(given, rules)


def choose_plan(args, model_default, auto: bool) -> tuple[str, ReductionPlan | None]:
    """The one choice of every command: ("none", None), ("default", the model's plan), ("explicit", plan) or, where
    the command has auto (`auto`), ("auto", None). `model_default()` gives the model's default plan, called only
    when needed. Raises PlanError for flags that contradict each other."""
    explicit = plan_from_flags(args, model_default)
    if sum(map(bool, (args.none, args.aim_default, explicit))) > 1:
        raise PlanError("give one of --none, --aim-default or an explicit plan's flags")
    if auto and (args.none or args.aim_default or explicit is not None):
        given = [flag for flag, value in (("--slo-ms", args.slo_ms), ("--min-retention", args.min_retention),
                                          ("--priority", args.priority)) if value]
        if given:
            raise PlanError(f"{', '.join(given)} only apply to auto requests, not with --none, --aim-default or an "
                            "explicit plan")
    if args.none:
        return "none", None
    if explicit is not None:
        return "explicit", explicit
    if args.aim_default or not auto:
        return "default", model_default()
    return "auto", None


def reduction_flags(p: argparse.ArgumentParser, auto: bool) -> None:
    g = p.add_argument_group("reduction", "Without these flags: " + (
        "auto, the server picks the plan for the latency target." if auto else "the model's default plan."))
    g.add_argument("--none", action="store_true", help="the untouched model: no merging, no pruning")
    g.add_argument("--aim-default", action="store_true", help="the model's default AIM plan: its calibrated plan "
                   "file (the reference model's merges alone, no pruning), else the paper's merging and progressive "
                   "pruning for its depth; `aim-serve info` shows it" + ("" if auto else " (what no flag gives)"))
    if auto:
        g.add_argument("--slo-ms", type=number(int, 0, UINT32), default=0, metavar="MS",
                       help="auto: latency target of the whole request, ms (default: 0 = the server's, "
                            "--default-slo-ms)")
        g.add_argument("--min-retention", type=number(float, 0, 1), default=0.0, metavar="R",
                       help="auto: the least share of visual tokens merging may keep, [0, 1]")
        g.add_argument("--priority", choices=PRIORITIES,
                       help="auto: low is reduced first under load, high last (default: normal)")
    add_plan_flags(p)


def request_flags(p: argparse.ArgumentParser, client: bool) -> None:
    def server(setting: str) -> str:
        return f" (default: 0 = the server's, {setting})" if client else ""

    p.add_argument("--prompt", required=not client, default="Describe it." if client else None, metavar="TEXT",
                   help="the question or instruction")
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt (default: the model's chat template's)")
    p.add_argument("--image", type=readable_file, action="append", default=[], metavar="FILE",
                   help="an image (PNG, JPEG, WebP, GIF); repeatable, in order before the prompt")
    p.add_argument("--video", type=readable_file, action="append", default=[], metavar="FILE",
                   help="a video (MP4, WebM, MKV, MOV, AVI); repeatable")
    p.add_argument("--frames", type=number(int, 0 if client else 1, UINT32), default=0 if client else 8,
                   metavar="N", help="frames sampled uniformly from each video" + server("--default-frames"))
    p.add_argument("--max-new-tokens", type=number(int, 0 if client else 1, UINT32), default=0 if client else 64,
                   metavar="N", help="most tokens to generate" + server("--default-max-new-tokens"))
    p.add_argument("--temperature", type=number(float, 0), default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=number(float, 0, 1), default=0.0 if client else 1.0, metavar="P",
                   help="nucleus sampling mass, [0, 1]; " + ("0 or 1 = off" if client else "1 = off"))
    p.add_argument("--seed", type=number(int, 0, 2**64 - 1), metavar="N", help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer at TEXT; repeatable")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON (stream: one object a line)")


def client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the server's address")
    p.add_argument("--token", help="bearer token, when the server has --auth-token")
    p.add_argument("--tls-ca", type=readable_file, metavar="PEM", help="root certificate to verify a TLS server")
    p.add_argument("--timeout", type=number(float, 0, low_open=True), metavar="S",
                   help="deadline of the call, seconds (default: none)")
    p.add_argument("--model", default="", metavar="NAME", help="served model (default: the server's first)")


def engine_flags(p: argparse.ArgumentParser, model_help: str = "local checkpoint directory") -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=model_help)
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")

