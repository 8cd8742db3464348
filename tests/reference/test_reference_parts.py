"""Parts of the reference model that need no packaged weights: LoRA, the trainer's reproducibility, and the
size of the committed product."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from reference_model.assemble import PRODUCT_DIR, load_product
from reference_model.lora import add_lora, lora_state, merge_lora
from reference_model import synthetic as syn
from reference_model.train import (TRIED_STAGES, Stage, Trainer, TrainConfig, object_patches, patch_coordinates,
                                        position_readout_loss)


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
        Stage("C", 2, image_size=32, frames=3, frame_size=24, video_share=0.5, restart_lr=0.5,
              position_loss=0.5)])


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
    assert resumed.step == straight.step == 5
    a, b = lora_state(straight.lora), lora_state(resumed.lora)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert all(h["loss"] > 0 for h in straight.history)
    # the position term is computed (and logged) in the stage that weighs it, and only there
    assert [("position" in h) for h in straight.history] == [False, False, False, True, True]
    assert all(0 < h["position"] for h in straight.history[3:])
    assert any(float(v.abs().sum()) > 0 for k, v in a.items() if k.endswith("lora_b"))  # training moved B off 0

    straight.export(tmp_path / "product")
    projector, lora, meta = load_product(tmp_path / "product")
    assert all(v.dtype == torch.float16 for v in [*projector.values(), *lora.values()])
    assert meta["steps_done"] == 5 and meta["config"] == json.loads(json.dumps(dataclasses.asdict(_tiny_config())))


def test_the_committed_product_is_small_half_precision_and_unmerged():
    weights = PRODUCT_DIR / "weights.safetensors"
    assert weights.is_file(), "the trained product must be in the repository"
    assert weights.stat().st_size <= 15 * 1024 * 1024
    projector, lora, meta = load_product()
    assert set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert lora and all(k.endswith((".lora_a", ".lora_b")) for k in lora)
    assert all(v.dtype == torch.float16 for v in [*projector.values(), *lora.values()])
    assert meta["steps_done"] == sum(s["steps"] for s in meta["config"]["stages"])  # a finished run


def test_patch_coordinates_are_centres_in_row_major_order():
    torch.testing.assert_close(patch_coordinates(4), torch.tensor([[.25, .25], [.75, .25], [.25, .75], [.75, .75]]))


def test_the_position_readout_loss_tells_tokens_that_carry_their_place_from_tokens_that_do_not():
    g = torch.Generator().manual_seed(0)
    frames, n, d = 16, 64, 24
    coords = patch_coordinates(n).repeat(frames, 1)
    mixing = torch.randn(2, d, generator=g)
    noise = torch.randn(frames * n, d, generator=g)
    carrying = (coords @ mixing + 0.05 * noise).reshape(frames, n, d)
    blind = noise.reshape(frames, n, d)
    assert float(position_readout_loss(carrying, n)) < 0.05
    assert float(position_readout_loss(blind, n)) > 0.9
    # weighting some patches up changes which patches the readout must get right: here the weighted patches'
    # tokens are noise, so the loss goes up
    half = torch.cat([carrying[:, : n // 2], blind[:, n // 2:]], dim=1)
    weights = torch.ones(frames, n)
    weights[:, n // 2:] = 9.0
    assert float(position_readout_loss(half, n, weights.reshape(-1))) > float(position_readout_loss(half, n)) + 0.1
    # and the loss trains: its gradient reaches the tokens
    tokens = blind.clone().requires_grad_(True)
    position_readout_loss(tokens, n).backward()
    assert float(tokens.grad.abs().sum()) > 0


def test_object_patches_are_where_the_shapes_are_drawn():
    scene = [syn.Obj("square", "red", 0.25, 0.25, 0.22)]  # a 24-px square centred on a patch corner
    cover = object_patches([syn.render(scene, 64)], 64, 16).reshape(4, 4)
    assert cover[0:2, 0:2].all() and int(cover.sum()) == 4  # the square spans the four top-left patches
    assert int(object_patches([syn.render([], 64)], 64, 16).sum()) == 0


def test_a_tried_stage_runs_after_the_products_stages_in_its_own_learning_rate_cycle():
    product = TrainConfig()
    tried = product.then(TRIED_STAGES["E"])
    assert product.stages == tried.stages[:-1] and tried.total_steps == product.total_steps + TRIED_STAGES["E"].steps
    assert tried.lr_cycles()[-1] == (product.total_steps, TRIED_STAGES["E"].steps, TRIED_STAGES["E"].restart_lr)
    # the product's own steps keep their learning rates, so a run resumed from the product's checkpoint is the
    # product's run continued
    assert all(tried.lr_factor(s) == product.lr_factor(s) for s in range(product.total_steps))
    assert tried.stage_at(product.total_steps).position_loss > 0


def test_a_clip_without_distractors_shows_one_object_moving_the_way_its_answer_says():
    import numpy as np

    for index in range(6):
        clip = syn.make_video(0, "train", index, 64, 4, distractors=False)
        assert [qa.qtype for qa in clip.qas] == ["direction"] and len(clip.frames) == 4
        centres = []
        for frame in clip.frames:
            drawn = np.abs(np.asarray(frame, dtype=np.int16) - np.asarray(syn.BACKGROUND)).sum(-1) > 30
            ys, xs = np.nonzero(drawn)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == clip.qas[0].answer and max(abs(dx), abs(dy)) > 0.3 * 64
