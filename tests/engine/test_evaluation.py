"""The eval command's parts: datasets (synthetic split, JSONL multiple choice), scoring, FLOPs matching, and the
report files; end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from PIL import Image

from aim_engine import AimEngine
from cli.main import main as engine_main
from aim_engine.errors import ModelLoadError
from evaluation.datasets import DatasetError, EvalItem, jsonl_dataset, load_dataset, synthetic_dataset
from evaluation.calibrate import candidates
from evaluation.report import records
from evaluation.runner import (PlanSpec, build_specs, evaluate, flops_ratio, match_knob, plan_key,
                                         model_identity)
from aim_engine.methods import METHODS
from aim_engine.plan import PLAN_FILE, PlanError, ReductionPlan, plan_from_dict, plan_to_dict
from reference_model import synthetic as syn
from tests.media_samples import encode_video


def test_synthetic_split_is_balanced_seeded_and_disjoint():
    a, b = synthetic_dataset(3, seed=0), synthetic_dataset(3, seed=0)
    assert [i.qtype for i in a.items].count("colour") == 3 and a.types == list(syn.QUESTION_TYPES)
    assert [(i.uid, i.answer) for i in a.items] == [(i.uid, i.answer) for i in b.items]
    assert a.items[0].parts[0].image.tobytes() == b.items[0].parts[0].image.tobytes()
    other = synthetic_dataset(3, seed=1)
    assert a.items[0].parts[0].image.tobytes() != other.items[0].parts[0].image.tobytes()
    train = syn.make_image(0, "train", 0)
    test = syn.make_image(0, "test", 0)
    assert train.frames[0].tobytes() != test.frames[0].tobytes()


def test_scoring_exact_match_and_option_letters():
    item = EvalItem("x", "colour", "image", [], "red")
    assert item.is_correct(" Red.") and not item.is_correct("dark red")
    mc = EvalItem("y", "all", "video", [], "B", multiple_choice=True)
    assert mc.is_correct("B") and mc.is_correct("B. a phone") and mc.is_correct("The answer is B")
    assert not mc.is_correct("A") and not mc.is_correct("Bob")


def test_jsonl_multiple_choice(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "clip.mp4").write_bytes(encode_video(frames=8))
    rows = [
        {"id": "a", "image": "red.png", "question": "Colour?", "options": ["blue", "red"], "answer": "red"},
        {"video": "clip.mp4", "question": "What moves?", "options": ["A. a square", "B. nothing"], "answer": "A",
         "type": "motion", "frames": 4},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = jsonl_dataset(tmp_path / "mc.jsonl")
    first, second = ds.items
    assert (first.uid, first.answer, first.kind) == ("a", "B", "image")
    assert first.parts[-1].text.splitlines()[1:3] == ["A. blue", "B. red"]
    assert "Answer with the option's letter" in first.parts[-1].text
    assert (second.uid, second.qtype, second.kind, second.parts[0].num_frames) == ("2", "motion", "video", 4)


@pytest.mark.parametrize("line,message", [
    ("{not json", "line 1: not JSON"),
    ('{"question": "q", "options": ["a", "b"]}', "missing 'answer'"),
    ('{"question": "q", "options": ["a"], "answer": "A"}', "list of 2"),
    ('{"question": "q", "options": ["a", "b"], "answer": "C"}', "neither an option letter"),
    ('{"question": "q", "options": ["a", "b"], "answer": "A", "image": "nope.png"}', "not found"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        jsonl_dataset(tmp_path / "bad.jsonl")


def test_matching_recovers_aims_own_default(engine_for):
    engine = engine_for("llava_dinov2", layers=8)
    ds = synthetic_dataset(1)
    shapes = [engine.shape_of(i.request()) for i in ds.items if i.kind == "video"]
    target = flops_ratio(engine, shapes, engine.default_plan())
    knob = match_knob(engine, lambda k: METHODS["aim"].plan(engine.num_layers, k), shapes, target)
    assert flops_ratio(engine, shapes, METHODS["aim"].plan(engine.num_layers, knob)) == pytest.approx(target)
    fastv = match_knob(engine, lambda k: METHODS["fastv"].plan(engine.num_layers, k), shapes, 1e9)
    assert fastv == 1e-3  # unreachable: the strongest setting


def test_eval_end_to_end_on_a_tiny_model(engine_for, checkpoint_dir, tmp_path):
    engine = engine_for("llava_dinov2", layers=8)
    ds = synthetic_dataset(1)
    specs = build_specs(engine, ds, ["aim", "pool", "evs"], sweep=[])
    assert [s.method for s in specs] == ["none", "aim", "pool", "evs"] and specs[1].is_default
    results = evaluate(engine, ds, specs[:2] + [PlanSpec("pool", "pool 0.5", {"*": METHODS["pool"].plan(8, 0.5)})])
    recs = records(results, ds.name, "tiny")
    assert {r["method"] for r in recs} == {"none", "aim", "pool"}
    for r in recs:
        assert {"method", "plan", "flops_ratio", "accuracy", "baseline_accuracy", "is_default"} <= set(r)
        assert r["questions"] == len(ds.items) and set(r["accuracy_by_type"]) == set(syn.QUESTION_TYPES)
    assert recs[0]["flops_ratio"] == 1.0 and recs[1]["flops_ratio"] > 1.5 and recs[1]["is_default"]
    assert sum(r["is_default"] for r in recs) == 1

    out = tmp_path / "fid"
    argv = ["eval", "--model", str(checkpoint_dir("llava_dinov2", layers=8)), "--dataset", "synthetic:1",
            "--methods", "aim,fastv", "--sweep", "", "--out", str(out),
            "--plan", "merge only:merge_retention=0.5,positions=original"]
    assert engine_main(argv) == 0
    journal = out.with_name("fid.answers.jsonl")
    assert len(journal.read_text().splitlines()) == 4 * len(ds.items)
    assert engine_main(argv) == 0
    assert len(journal.read_text().splitlines()) == 4 * len(ds.items)  # resumed: nothing re-run
    assert engine_main(argv + ["--dtype", "bfloat16"]) == 0  # another dtype gives other answers: all re-run
    assert len(journal.read_text().splitlines()) == 8 * len(ds.items)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data] == ["none", "aim", "custom", "fastv"]
    assert data[2]["label"] == "merge only" and data[2]["plan"] == "merge→0.5, original positions"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method | plan | FLOPs ratio |" in out.with_suffix(".md").read_text()


def test_a_family_without_video_is_evaluated_on_the_image_questions(checkpoint_dir, tmp_path):
    ds = synthetic_dataset(1)
    assert ds.for_family(True) is ds
    images = ds.for_family(False)
    assert images.name == ds.name + "-images" and {i.kind for i in images.items} == {"image"}
    assert len(images.items) == sum(i.kind == "image" for i in ds.items) > 0
    out = tmp_path / "fid"
    argv = ["eval", "--model", str(checkpoint_dir("gemma3")), "--dataset", "synthetic:1", "--methods", "aim",
            "--sweep", "", "--out", str(out)]
    assert engine_main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in data] == ["none", "aim"] and data[1]["questions"] == len(images.items)


def test_a_journal_key_names_a_plan_by_what_differs_from_the_empty_plan():
    """So a field added to ReductionPlan later leaves the answers journaled before it valid."""
    assert plan_key(ReductionPlan()) == "{}"
    plan = ReductionPlan(merge_retention=0.25, reducer="vidcom2", prune_stages=((2, 0.5),))
    assert json.loads(plan_key(plan)) == {"merge_retention": 0.25, "reducer": "vidcom2", "prune_stages": [[2, 0.5]]}
    assert plan_key(plan) != plan_key(dataclasses.replace(plan, merge_pruned=True))
    assert len({plan_key(p) for p in (plan, dataclasses.replace(plan, importance="text"), ReductionPlan())}) == 3


def test_model_identity_follows_the_checkpoint_content_not_its_name(checkpoint_dir, tmp_path):
    source = checkpoint_dir("llava_dinov2", layers=2)
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    assert model_identity(copy) == model_identity(source)  # same content, same answers
    assert model_identity(copy, dtype="bfloat16") != model_identity(copy)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert model_identity(copy) != model_identity(source)


def test_custom_plans_start_empty_or_from_the_default(engine_for, capsys):
    engine = engine_for("llava_dinov2", layers=8)
    ds = synthetic_dataset(1)
    specs = build_specs(engine, ds, ["aim"], sweep=[], match=False, custom={
        "late": "default,prune_start=6,prune_end=8", "merge only": "merge_retention=0.25",
        "vidcom2 + late pruning": "reducer=vidcom2,merge_retention=match,prune_start=6,prune_end=8"})
    default = engine.default_plan()
    late, merge_only = specs[2].plans["*"], specs[3].plans["*"]
    assert (late.merge_retention, late.prune_start, late.prune_end) == (default.merge_retention, 6, 8)
    assert merge_only == ReductionPlan(merge_retention=0.25)
    combined = specs[4]  # matched to the default's FLOPs for each kind, the rest of the plan as given
    assert combined.matched_to == "aim-default" and set(combined.plans) == {i.kind for i in ds.items}
    for kind, plan in combined.plans.items():
        shapes = [engine.shape_of(i.request()) for i in ds.items if i.kind == kind]
        assert plan == ReductionPlan(reducer="vidcom2", merge_retention=combined.knobs[kind], prune_start=6,
                                     prune_end=8)
        target = flops_ratio(engine, shapes, default)
        assert flops_ratio(engine, shapes, plan) >= target  # and one more token per 16-token image misses it
        more = dataclasses.replace(plan, merge_retention=min(1.0, combined.knobs[kind] + 1 / 16))
        assert flops_ratio(engine, shapes, more) < target
    with pytest.raises(PlanError, match="beyond the model's 8 layers"):
        build_specs(engine, ds, ["aim"], sweep=[], match=False, custom={"x": "prune_start=9,prune_end=12"})
    assert engine_main(["eval", "--model", "/nonexistent", "--plan", "bad:merge_ratio=2"]) == 2
    assert "merge_ratio=2" in capsys.readouterr().err


def test_calibration_keeps_the_paper_defaults_flops_and_becomes_the_models_default(checkpoint_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoint_dir("llava_dinov2", layers=8), model)
    engine = AimEngine.load(model)
    paper = ReductionPlan.default_for_depth(8)
    assert engine.default_plan() == paper  # no plan file: the paper default scaled to depth
    ds = load_dataset("synthetic-val:1")
    assert ds.name == "synthetic-val" and {i.uid for i in ds.items}.isdisjoint(
        i.uid for i in synthetic_dataset(1).items)

    assert engine_main(["calibrate", "--model", str(model), "--dataset", "synthetic-val:1"]) == 0
    content = json.loads((model / PLAN_FILE).read_text())
    table = content["calibration"]
    assert table["candidates"][0]["label"] == "paper default"
    target = table["target_flops_ratio"]
    assert target == pytest.approx(flops_ratio(engine, [engine.shape_of(i.request()) for i in ds.items], paper),
                                   abs=1e-4)
    rules = {("original positions" in c["plan"], "proportional attention" in c["plan"]) for c in table["candidates"]}
    assert len(rules) == 4  # a 1-D RoPE model tries both position rules, each with both attention rules
    evaluated = [c for c in table["candidates"] if c["accuracy"] is not None]
    assert len(evaluated) >= 6
    for c in evaluated:  # every candidate spends the same FLOPs (to the knob's rounding), never more
        assert target <= c["flops_ratio"] <= 1.1 * target
    best = max(c["accuracy"] for c in evaluated)
    chosen = next(c for c in evaluated if c["label"] == table["chosen"])
    assert chosen["accuracy"] == best and chosen["plan"] == content["describe"]
    assert chosen is next(c for c in evaluated if c["accuracy"] == best)  # ties go to the earlier (paper first)

    reloaded = AimEngine.load(model)
    assert reloaded.default_plan() == plan_from_dict(content["default_plan"])
    assert reloaded.default_plan().describe() == content["describe"]


def test_calibration_can_search_peer_reducers_under_aims_pruning(engine_for, capsys):
    engine = engine_for("llava_dinov2", layers=8)
    shapes = [engine.shape_of(i.request()) for i in load_dataset("synthetic-val:1").items]
    target = flops_ratio(engine, shapes, ReductionPlan.default_for_depth(8))
    pool = candidates(engine, shapes, target, ("merge", "vidcom2", "holitom"))
    by_reducer = {r: [c for c in pool[1:] if c.plan.reducer == r] for r in ("merge", "vidcom2", "holitom")}
    assert len(by_reducer["merge"]) + 1 == len(pool) - len(by_reducer["vidcom2"]) - len(by_reducer["holitom"])
    # vidcom2's survivors stand for one token each: proportional attention would change nothing, so it is not tried
    assert not any(c.plan.proportional_attention for c in by_reducer["vidcom2"])
    assert any(c.plan.proportional_attention for c in by_reducer["holitom"])
    for reducer, group in by_reducer.items():
        assert any(c.plan.prunes for c in group) and any(not c.plan.prunes for c in group)  # with and without
        for c in group:
            assert reducer in c.label and (not c.reachable or target <= c.flops_ratio <= 1.1 * target)
    with pytest.raises(ValueError, match="unknown"):
        candidates(engine, shapes, target, ("tome",))
    with pytest.raises(SystemExit) as usage:  # a usage error, before the model loads
        engine_main(["calibrate", "--model", "/nonexistent", "--reducers", "merge,tome"])
    assert usage.value.code == 2 and "--reducers" in capsys.readouterr().err


def test_the_aim_sweep_holds_the_paper_point_unless_a_calibrated_default_replaces_it(checkpoint_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoint_dir("llava_dinov2", layers=8), model)
    ds = synthetic_dataset(1)
    specs = build_specs(AimEngine.load(model), ds, ["aim"], match=False)
    assert specs[1].is_default and specs[1].knobs == {"*": 0.25}  # the paper default is the sweep's 0.25 point
    assert [s.label for s in specs[2:]] == ["aim 0.5", "aim 0.125"]
    calibrated = ReductionPlan(merge_retention=0.2, prune_start=6, prune_end=8, positions="original")
    (model / PLAN_FILE).write_text(json.dumps({"default_plan": plan_to_dict(calibrated)}))
    specs = build_specs(AimEngine.load(model), ds, ["aim"], match=False)
    assert specs[1].plans == {"*": calibrated} and specs[1].knobs == {}  # starred apart from the sweep's line
    assert [s.label for s in specs[2:]] == ["aim 0.5", "aim 0.25", "aim 0.125"]


@pytest.mark.parametrize("content,message", [
    ("{not json", "does not hold a valid default plan"),
    ('{"plan": {}}', "does not hold a valid default plan"),
    ('{"default_plan": {"merge_ratio": 0.5}}', "unknown plan field"),
    ('{"default_plan": {"merge_retention": 0.5, "prune_start": 9, "prune_end": 12}}', "does not fit the model"),
])
def test_a_bad_plan_file_stops_loading_with_a_clear_error(checkpoint_dir, tmp_path, content, message):
    model = tmp_path / "model"
    shutil.copytree(checkpoint_dir("llava_dinov2", layers=8), model)
    (model / PLAN_FILE).write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        AimEngine.load(model)
