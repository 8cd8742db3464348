"""The reference model and evaluation: build-reference, train-reference, eval, calibrate (the `reference` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aim_engine.plan import PRE_LLM_METHODS, ReductionPlan

from .engine import load_engine
from .flags import engine_flags, number, reducer_list


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
    engine = load_engine(args)
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

    engine = load_engine(args)
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


def add_commands(command) -> None:
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
    train.add_argument("--until-step", type=number(int, 1), metavar="N",
                       help="stop after this step (resume later from the checkpoint; default: to the end)")
    train.add_argument("--product", metavar="DIR", help="where to write the product (default: the package's product/)")
    train.add_argument("--seed", type=int, default=0, help="training seed")
    train.add_argument("--threads", type=number(int, 1), metavar="N", help="CPU threads (default: torch's)")
    train.add_argument("--then", action="append", default=[], metavar="STAGE",
                       help="after the product's stages, also run this stage that was tried and not adopted "
                            "(reference_model/train.py TRIED_STAGES: D, E, F; docs/fidelity.md); repeatable")

    ev = command("eval", cmd_eval, "accuracy against LLM FLOPs of plans and methods on a dataset", extra="reference")
    engine_flags(ev)
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
    ev.add_argument("--threads", type=number(int, 1), metavar="N", help="CPU threads (default: torch's)")
    ev.add_argument("--command-line", help=argparse.SUPPRESS)

    cal = command("calibrate", cmd_calibrate, "choose the model's own default plan on held-out data (the paper "
                  "default's FLOPs, best accuracy) and write it into the checkpoint", extra="reference")
    engine_flags(cal)
    cal.add_argument("--dataset", default="synthetic-val:15",
                     help="held-out data: synthetic-val[:N per type] or a .jsonl file, not the test set "
                          "(default: synthetic-val:15)")
    cal.add_argument("--target-ratio", type=number(float, 1), metavar="X",
                     help="LLM prefill FLOPs reduction to hold (default: the paper default plan's on this data)")
    cal.add_argument("--reducers", type=reducer_list, default=["merge"], metavar="R,...",
                     help="pre-LLM reducers to try, each alone and under each prune range, e.g. merge,vidcom2,holitom "
                          f"(of {', '.join(PRE_LLM_METHODS)}; default: merge)")
    cal.add_argument("--out", metavar="FILE", help="where to write the plan file (default: MODEL/aim-plan.json)")
    cal.add_argument("--seed", type=int, default=0, help="dataset seed")
    cal.add_argument("--threads", type=number(int, 1), metavar="N", help="CPU threads (default: torch's)")
