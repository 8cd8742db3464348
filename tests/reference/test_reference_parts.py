"""Parts of the reference model that need no packaged weights: LoRA, the trainer's reproducibility, and the
size of the committed product."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from aim_engine.reference.assemble import PRODUCT_DIR, load_product
from aim_engine.reference.lora import add_lora, lora_state, merge_lora
from aim_engine.reference.train import Stage, Trainer, TrainConfig


def test_lora_merges_into_the_weights_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    net[0].q_proj = nn.Linear(8, 8)  # a target name, nested
    block = nn.Module()
    block.q_proj, block.up_proj = nn.Linear(8, 8), nn.Linear(8, 12)
    layers = nn.ModuleList([block])
    wrapped = add_lora(layers, rank=4, alpha=8, seed=0)
    assert set(wrapped) == {"0.q_proj", "0.up_proj"}
    for lora in wrapped.values():
        torch.nn.init.normal_(lora.lora_b)  # as if trained
    x = torch.randn(5, 8)
    with torch.no_grad():
        adapted = (layers[0].q_proj(x), layers[0].up_proj(x))
    state = lora_state(wrapped)
    plain = nn.ModuleList([nn.Module()])
    plain[0].q_proj, plain[0].up_proj = wrapped["0.q_proj"].base, wrapped["0.up_proj"].base
    assert merge_lora(plain, state, scale=8 / 4) == 2
    with torch.no_grad():
        torch.testing.assert_close(plain[0].q_proj(x), adapted[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain[0].up_proj(x), adapted[1], atol=1e-5, rtol=1e-5)


def _tiny_config() -> TrainConfig:
    return TrainConfig(batch_size=2, warmup_steps=1, lora_rank=2, stages=[
        Stage("A", 2, image_size=32, frames=2, frame_size=24, video_share=0.5),
        Stage("B", 1, image_size=32, frames=3, frame_size=24, video_share=0.5),
        Stage("C", 1, image_size=32, frames=3, frame_size=24, video_share=0.5, restart_lr=0.5)])


def test_learning_rate_cycles_warm_up_decay_and_restart():
    config = TrainConfig(warmup_steps=10, min_lr_fraction=0.1, stages=[
        Stage("A", 60, image_size=32, frames=2, frame_size=24, video_share=0.5),
        Stage("B", 40, image_size=32, frames=2, frame_size=24, video_share=0.5),
        Stage("C", 50, image_size=32, frames=2, frame_size=24, video_share=0.5, restart_lr=0.5)])
    assert config.lr_cycles() == [(0, 100, 1.0), (100, 50, 0.5)]
    lr = [config.lr_factor(step) for step in range(config.total_steps)]
    assert lr[0] == 0.1 and lr[9] == 1.0  # warm-up
    assert all(a >= b for a, b in zip(lr[9:100], lr[10:100]))  # one cosine over stages A and B
    assert abs(lr[99] - 0.1) < 1e-3
    assert lr[100] == 0.05 and lr[109] == 0.5  # the restart warms up to its own peak
    assert all(a >= b for a, b in zip(lr[109:], lr[110:])) and abs(lr[149] - 0.05) < 1e-3


def test_training_resumes_to_the_same_weights_as_an_uninterrupted_run(checkpoint_dir, tmp_path):
    base = checkpoint_dir("llava_dinov2", layers=2)
    straight = Trainer(base, tmp_path / "straight", _tiny_config(), threads=1)
    straight.train()
    first = Trainer(base, tmp_path / "resumed", _tiny_config(), threads=1)
    first.train(until_step=2)
    resumed = Trainer(base, tmp_path / "resumed", _tiny_config(), threads=1)
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == straight.step == 4
    a, b = lora_state(straight.lora), lora_state(resumed.lora)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert all(h["loss"] > 0 for h in straight.history)
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if k.endswith("lora_b"))  # training moved B off 0

    straight.export(tmp_path / "product")
    projector, lora, meta = load_product(tmp_path / "product")
    assert all(v.dtype == torch.float16 for v in [*projector.values(), *lora.values()])
    assert meta["steps_done"] == 4 and meta["config"] == json.loads(json.dumps(dataclasses.asdict(_tiny_config())))


def test_the_committed_product_is_small_half_precision_and_unmerged():
    weights = PRODUCT_DIR / "weights.safetensors"
    assert weights.is_file(), "the trained product must be in the repository"
    assert weights.stat().st_size <= 15 * 1024 * 1024
    projector, lora, meta = load_product()
    assert set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert lora and all(k.endswith((".lora_a", ".lora_b")) for k in lora)
    assert all(v.dtype == torch.float16 for v in [*projector.values(), *lora.values()])
    assert meta["steps_done"] == sum(s["steps"] for s in meta["config"]["stages"])  # a finished run
