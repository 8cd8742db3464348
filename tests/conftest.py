"""Shared fixtures: tiny random checkpoints of each family, built once per test session from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aim_engine import AimEngine
from aim_engine.tiny import BUILDERS

# Tiny checkpoint builders (aim_engine.tiny.BUILDERS); llava_dinov2 is the LLaVA family shaped like the reference
# model (DINOv2 tower read at two layers, video as frames behind a <video> placeholder).
FAMILIES = ("llava_onevision", "llava", "llava_dinov2", "llava_next", "qwen2_vl", "qwen2_5_vl")
VIDEO_FAMILIES = ("llava_onevision", "llava_dinov2", "qwen2_vl", "qwen2_5_vl")


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
            engines[key] = AimEngine.load(checkpoint_dir(family, **kwargs))
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
