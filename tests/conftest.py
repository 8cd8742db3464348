"""Shared fixtures: tiny random checkpoints of each family, built once per test session from configs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from aim_engine import AimEngine
from aim_engine.tiny import BUILDERS

# Tiny checkpoint builders (aim_engine.tiny.BUILDERS); llava_dinov2 is the LLaVA family shaped like the reference
# model (DINOv2 tower read at two layers, video as frames behind a <video> placeholder); qwen3_vl_moe is Qwen3-VL
# with a mixture-of-experts text model, internvl_qwen3 InternVL with a Qwen3 LM (InternVL3.5's).
FAMILIES = ("llava_onevision", "llava", "llava_dinov2", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
            "qwen3_vl_moe", "internvl", "internvl_qwen3", "gemma3")
VIDEO_FAMILIES = ("llava_onevision", "llava_dinov2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl")

# The engine tests run on CPU in fp32 (CI). bench/gpu_check.sh runs the exactness and batching tests again on
# CUDA in bf16 by setting these; tolerances follow the dtype.
TEST_DEVICE = os.environ.get("AIM_TEST_DEVICE", "cpu")
TEST_DTYPE = getattr(torch, os.environ.get("AIM_TEST_DTYPE", "float32"))


def logit_tolerance(fp32: float) -> float:
    """Absolute logit tolerance: `fp32` in float32; in bf16/fp16 a few units of the format's precision."""
    return fp32 if TEST_DTYPE == torch.float32 else 6e-2


def assert_same_greedy(tokens, logits, ref_tokens, ref_logits, atol: float) -> None:
    """Same greedy tokens and per-step logits within `atol`, up to a near-tie: where the reference's two best
    logits are closer than the tolerance either token is right, and the runs are compared up to there (as
    vLLM's own tests do)."""
    for step, (a, b) in enumerate(zip(tokens, ref_tokens)):
        torch.testing.assert_close(logits[step].float().cpu(), ref_logits[step].float().cpu(), atol=atol, rtol=0)
        if a != b:
            top2 = torch.topk(ref_logits[step].float(), 2).values
            assert float(top2[0] - top2[1]) < 2 * atol, f"step {step}: {a} != {b} without a near-tie"
            return
    assert list(tokens) == list(ref_tokens)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    built = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in built:
            torch.manual_seed(0)
            built[key] = BUILDERS[family](tmp_path_factory.mktemp(family), **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def engine_for(checkpoint_dir):
    engines = {}

    def get(family: str, **kwargs) -> AimEngine:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in engines:
            engines[key] = AimEngine.load(checkpoint_dir(family, **kwargs), device=TEST_DEVICE, dtype=TEST_DTYPE)
        return engines[key]

    return get


@pytest.fixture(scope="session")
def tiny_engines(engine_for):
    return {"tiny-ov": engine_for("llava_onevision", layers=6, image_size=64), "tiny-llava": engine_for("llava")}


def random_image(seed: int, size=(40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def random_frames(seed: int, count: int, size=(32, 32)) -> list[Image.Image]:
    """Frames with temporal redundancy (a drifting pattern plus noise), like real video."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[0], size[1] * 2, 3)).astype(np.float32)
    frames = []
    for t in range(count):
        shifted = np.roll(base, t, axis=1)[:, : size[1]]
        noisy = np.clip(shifted + rng.normal(0, 8, shifted.shape), 0, 255).astype(np.uint8)
        frames.append(Image.fromarray(noisy))
    return frames
