"""Physical pruning is exact: with the same kept sets, a full-length run in which pruned tokens are masked out
(keys) from their decision layer on, with original positions, gives the same logits as the run where they
are removed — in prefill and over 24 decode steps. Plus the structural guarantees of the kept sets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import DynamicCache

from aim_engine import GenerationRequest, ImagePart, ReductionPlan, TextPart, VideoPart
from aim_engine.decoder import LanguageModel, decode_step, prefill
from tests.conftest import random_frames, random_image

DECODE_STEPS = 24
LAYERS = 6


def physical_run(engine, prepared, plan, steps):
    pre = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, plan, steps,
                  record_kept=True, key_bias=prepared.key_bias, deepstack=prepared.deepstack,
                  blocks=prepared.blocks)
    logits, tokens = [pre.logits], []
    for step in range(steps):
        tokens.append(int(torch.argmax(logits[-1])))
        token = torch.tensor([[tokens[-1]]])
        logits.append(decode_step(engine.lm, token, engine.preparer.decode_positions(prepared, step), pre.cache))
    return pre, torch.stack(logits), tokens


@torch.inference_mode()
def masked_reference(engine, prepared, kept_per_layer, tokens, merge_pruned=False):
    """Every token runs through every layer; from a token's decision layer on, no query may attend to it.
    DeepStack levels are added to every visual token, pruned or not (what a pruned token holds reaches no one).
    Under proportional attention every query adds the prompt's key bias (log size) to its logits. With
    `merge_pruned`, at a decision layer each token pruned there is first averaged into the kept visual token whose
    hidden state is most like its own (cosine), one token at a time, as the plan field says."""
    lm = engine.lm
    n = prepared.embeds.shape[1]
    bias = prepared.key_bias if prepared.key_bias is not None else torch.zeros(n)
    cache = DynamicCache()
    rotary = lm.rotary(prepared.embeds, prepared.position_ids)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    if prepared.blocks is not None:  # Gemma 3: an image's tokens see each other both ways
        blocks = prepared.blocks
        causal |= (blocks[:, None] == blocks[None, :]) & (blocks[None, :] >= 0)
    positions = prepared.position_ids[0] if prepared.position_ids.dim() == 2 else None

    def in_window(layer_idx, query_positions, key_positions):
        """Sliding-window layers: keys less than the window before the query, by position."""
        window = lm.window(layer_idx)
        if window is None:
            return torch.ones(len(query_positions), len(key_positions), dtype=torch.bool)
        return (query_positions[:, None] - key_positions[None, :]) < window

    def additive(allowed, key_bias):
        return torch.where(allowed, key_bias, torch.tensor(float("-inf"))).to(prepared.embeds.dtype)

    alive, biases, hidden = [], [], prepared.embeds
    for layer_idx, layer in enumerate(lm.layers):
        keys_alive = torch.zeros(n, dtype=torch.bool)
        keys_alive[kept_per_layer[layer_idx]] = True
        if merge_pruned and layer_idx > 0:
            hidden, bias = merged_reference(hidden, bias, alive[-1] & ~keys_alive, keys_alive & prepared.is_visual,
                                            prepared.key_bias is not None)
        alive.append(keys_alive)
        biases.append(bias)
        seen = causal if positions is None else causal & in_window(layer_idx, positions, positions)
        mask = (seen & keys_alive[None, :]) | torch.eye(n, dtype=torch.bool)
        hidden = layer(hidden, attention_mask=additive(mask, bias[None, :])[None, None],
                       position_embeddings=rotary[lm.rope_of(layer_idx)], cache=cache, use_cache=True)
        if prepared.deepstack is not None and layer_idx < prepared.deepstack.shape[0]:  # into every visual token
            hidden = hidden.clone()
            hidden[0, prepared.is_visual] += prepared.deepstack[layer_idx]
    logits = [lm.lm_head(lm.norm(hidden[:, -1:]))[0, -1].float()]
    for step, token in enumerate(tokens):
        hidden = lm.embed_tokens(torch.tensor([[token]]))
        rotary = lm.rotary(hidden, engine.preparer.decode_positions(prepared, step))
        for layer_idx, layer in enumerate(lm.layers):
            mask = torch.cat([alive[layer_idx], torch.ones(step + 1, dtype=torch.bool)])
            if positions is not None:
                keys = torch.cat([positions, prepared.next_position + torch.arange(step + 1)])
                mask &= in_window(layer_idx, torch.tensor([prepared.next_position + step]), keys)[0]
            key_bias = torch.cat([biases[layer_idx], torch.zeros(step + 1)])
            hidden = layer(hidden, attention_mask=additive(mask, key_bias)[None, None, None],
                           position_embeddings=rotary[lm.rope_of(layer_idx)], cache=cache, use_cache=True)
        logits.append(lm.lm_head(lm.norm(hidden))[0, -1].float())
    return torch.stack(logits)


def merged_reference(hidden, bias, pruned, kept, proportional):
    """Each pruned token joins the kept visual token most like it; a kept token becomes its group's mean weighted
    by the tokens each member stands for (exp(bias)), and under proportional attention stands for their total."""
    states, bias = hidden[0].clone(), bias.clone()
    groups = {int(k): [int(k)] for k in torch.nonzero(kept).flatten()}
    if not groups:
        return hidden, bias
    for d in torch.nonzero(pruned).flatten().tolist():
        nearest = max(groups, key=lambda k: float(torch.nn.functional.cosine_similarity(
            hidden[0, d].float(), hidden[0, k].float(), dim=0)))
        groups[nearest].append(d)
    for k, members in groups.items():
        sizes = bias[members].exp()
        states[k] = ((hidden[0, members].float() * sizes[:, None]).sum(0) / sizes.sum()).to(hidden.dtype)
        if proportional:
            bias[k] = sizes.sum().log()
    return states[None], bias


def cases():
    yield "llava_onevision", "video", [VideoPart(frames=random_frames(5, 6, (64, 64))), TextPart("What moves?")]
    yield "llava_onevision", "image+video", [ImagePart(image=random_image(6)), TextPart("and"),
                                             VideoPart(frames=random_frames(7, 4, (64, 64))), TextPart("Same?")]
    yield "llava", "two-images", [ImagePart(image=random_image(8)), ImagePart(image=random_image(9)),
                                  TextPart("Which is brighter?")]
    yield "llava_next", "anyres image", [ImagePart(image=random_image(15, (50, 90))), TextPart("Read it.")]
    yield "qwen2_vl", "image+video", [ImagePart(image=random_image(10, (32, 48))), TextPart("then"),
                                      VideoPart(frames=random_frames(11, 4)), TextPart("Describe.")]
    yield "qwen2_5_vl", "video", [VideoPart(frames=random_frames(14, 6), fps=3.0), TextPart("Describe.")]
    # DeepStack levels after layers 0 and 1; a video's temporal patches with their timestamps between them
    yield "qwen3_vl", "image+video", [ImagePart(image=random_image(16, (32, 48))), TextPart("then"),
                                      VideoPart(frames=random_frames(17, 6), fps=4.0), TextPart("Describe.")]
    # an image of 2 tiles + thumbnail, then a video: one <img> ... </img> per frame, "FrameN:" between them
    yield "internvl", "image+video", [ImagePart(image=random_image(20, (40, 90))), TextPart("then"),
                                      VideoPart(frames=random_frames(21, 4)), TextPart("Describe.")]
    # sliding layers (window 8 positions) and two images whose tokens see each other both ways
    yield "gemma3", "two-images", [TextPart("Compare"), ImagePart(image=random_image(22)), TextPart("with"),
                                   ImagePart(image=random_image(23, (30, 30))), TextPart("please.")]
    yield "qwen3_vl_moe", "two-images", [ImagePart(image=random_image(18, (32, 48))), TextPart("or"),
                                         ImagePart(image=random_image(19, (40, 32))), TextPart("Which?")]


PLANS = {
    "merge+prune/pagerank": ReductionPlan(merge_retention=0.5, prune_start=2, prune_end=5, importance="pagerank"),
    "prune-only/text": ReductionPlan(prune_start=1, prune_end=4, importance="text"),
    # FastV / PDrop shape: staged cuts ranked by the last prompt token
    "stages/last_token": ReductionPlan(prune_stages=((2, 0.5), (4, 0.2)), importance="last_token"),
    # a cut before layer 1: Qwen3-VL's DeepStack still adds a level after it, to the survivors only
    "early-stage/last_token": ReductionPlan(prune_stages=((1, 0.5), (3, 0.2)), importance="last_token"),
    "merge+prune/original-positions": ReductionPlan(merge_retention=0.5, prune_start=2, prune_end=5,
                                                    positions="original"),
    "merge+prune/proportional": ReductionPlan(merge_retention=0.5, prune_start=2, prune_end=5,
                                              proportional_attention=True),
    # HoliTom's shape: its reducer, and the pruned averaged into their nearest kept token
    "holitom/merge-pruned": ReductionPlan(merge_retention=0.5, reducer="holitom", prune_stages=((2, 0.5), (4, 0.2)),
                                          importance="last_token", merge_pruned=True),
    "progressive/merge-pruned": ReductionPlan(prune_start=2, prune_end=5, merge_pruned=True),
    "merge+prune/proportional+merge-pruned": ReductionPlan(merge_retention=0.5, prune_start=2, prune_end=5,
                                                           positions="original", proportional_attention=True,
                                                           merge_pruned=True),
}


@pytest.mark.parametrize("family,case,parts", list(cases()), ids=[f"{f}-{c}" for f, c, _ in cases()])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_physical_pruning_equals_masked_reference(engine_for, family, case, parts, plan_name):
    engine = engine_for(family, layers=LAYERS, image_size=64) if family.startswith("llava") else \
        engine_for(family, layers=LAYERS)
    plan = PLANS[plan_name]
    prepared = engine.prepare(GenerationRequest(parts), plan)
    if plan.proportional_attention:  # the bias is there, for the visual tokens only, and counts every input token
        assert prepared.key_bias is not None and (prepared.key_bias[~prepared.is_visual] == 0).all()
        assert prepared.key_bias[prepared.is_visual].exp().sum().round() == prepared.visual_in
        assert prepared.key_bias.max() > 0
    pre, logits, tokens = physical_run(engine, prepared, plan, DECODE_STEPS)

    # something was actually pruned, and the KV cache of later layers is physically shorter
    assert pre.visual_per_layer[0] > 0 and pre.visual_per_layer[-1] < pre.visual_per_layer[0]
    for layer_idx, n_tokens in enumerate(pre.tokens_per_layer):
        assert pre.cache.get_seq_length(layer_idx) == n_tokens + DECODE_STEPS

    reference = masked_reference(engine, prepared, pre.kept_per_layer, tokens, plan.merge_pruned)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)
    if plan.merge_pruned:  # and merging is not dropping: the plain-pruned reference differs
        dropped = masked_reference(engine, prepared, pre.kept_per_layer, tokens)
        assert not torch.allclose(logits, dropped, atol=1e-3)


@pytest.mark.parametrize("importance", ["pagerank", "text"])
def test_kept_sets_are_nested_keep_all_text_and_follow_the_schedule(engine_for, importance):
    engine = engine_for("llava_onevision", layers=LAYERS, image_size=64)
    plan = ReductionPlan(merge_tokens=8, prune_start=2, prune_end=5, importance=importance)
    parts = [TextPart("Look:"), VideoPart(frames=random_frames(12, 5, (64, 64))), TextPart("Count them.")]
    prepared = engine.prepare(GenerationRequest(parts), plan)
    pre = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, plan, 1, record_kept=True)

    merged_visual = int(prepared.is_visual.sum())
    assert merged_visual == 5 * 8 + 1  # 8 per frame after merging, plus the video's newline token
    assert pre.visual_per_layer == plan.visual_tokens_per_layer(merged_visual, LAYERS)
    text = set(torch.nonzero(~prepared.is_visual).flatten().tolist())
    for earlier, later in zip(pre.kept_per_layer, pre.kept_per_layer[1:]):
        assert set(later.tolist()) <= set(earlier.tolist())
    for kept in pre.kept_per_layer:
        assert text <= set(kept.tolist())
        assert torch.all(kept[1:] > kept[:-1])  # original order


def test_importance_methods_choose_differently(engine_for):
    engine = engine_for("llava_onevision", layers=LAYERS, image_size=64)
    parts = [VideoPart(frames=random_frames(13, 4, (64, 64))), TextPart("What is shown?")]
    kept = {}
    for importance in ("pagerank", "text"):
        plan = ReductionPlan(prune_start=1, prune_end=4, importance=importance)
        prepared = engine.prepare(GenerationRequest(parts), plan)
        pre = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, plan, 1,
                      record_kept=True)
        kept[importance] = pre.kept_per_layer[2].tolist()
    assert kept["pagerank"] != kept["text"]


@pytest.mark.parametrize("family", ["llava_onevision", "llava"])
def test_original_positions_equal_masking_the_merged_away_tokens(engine_for, family):
    """With positions="original" on a 1-D RoPE model, the merged prompt behaves exactly like the full-length
    prompt in which each survivor carries its merged embedding at its own position and every merged-away
    token is invisible: text after the media keeps the position it has without reduction."""
    engine = engine_for(family, layers=LAYERS, image_size=64)
    media = VideoPart(frames=random_frames(16, 4, (64, 64))) if family == "llava_onevision" else \
        ImagePart(image=random_image(17))
    request = GenerationRequest([TextPart("Look:"), media, TextPart("Count them.")])
    plan = ReductionPlan(merge_retention=0.25, positions="original")
    reduced = engine.prepare(request, plan)
    full = engine.prepare(request, ReductionPlan())
    assert reduced.embeds.shape[1] < full.embeds.shape[1]
    assert reduced.next_position == full.next_position

    index = reduced.position_ids[0]
    embeds = full.embeds.clone()
    embeds[0, index] = reduced.embeds[0]
    spliced = dataclasses.replace(full, embeds=embeds)
    _, logits, tokens = physical_run(engine, reduced, plan, DECODE_STEPS)
    reference = masked_reference(engine, spliced, [index] * LAYERS, tokens)
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_proportional_attention_makes_one_token_of_size_s_equal_s_identical_tokens(engine_for):
    """In a layer where s identical tokens (same embedding, same position) are replaced by one with bias log s,
    every later query sees the same attention distribution, so a one-layer LM gives the same logits, in
    prefill and decode. Without the bias it does not."""
    engine = engine_for("llava_onevision", layers=LAYERS, image_size=64)
    full = engine.lm
    lm = LanguageModel(full.embed_tokens, full.layers[:1], full.norm, full.rotary_emb, full.lm_head)
    torch.manual_seed(3)
    d = full.embed_tokens.weight.shape[1]
    prefix, repeated, other, suffix = (torch.randn(1, k, d) for k in (3, 1, 1, 4))
    copies = 3
    long_embeds = torch.cat([prefix, repeated.expand(1, copies, d), other, suffix], dim=1)
    long_pos = torch.tensor([[0, 1, 2] + [3] * copies + [4, 5, 6, 7, 8]])
    short_embeds = torch.cat([prefix, repeated, other, suffix], dim=1)
    short_pos = torch.arange(9)[None]
    bias = torch.zeros(9)
    bias[3] = math.log(copies)
    plan = ReductionPlan()

    def run(embeds, positions, key_bias):
        is_visual = torch.zeros(embeds.shape[1], dtype=torch.bool)
        pre = prefill(lm, embeds, positions, is_visual, plan, 3, key_bias=key_bias)
        logits = [pre.logits]
        for step, token in enumerate((5, 17, 2)):
            logits.append(decode_step(lm, torch.tensor([[token]]), torch.tensor([[9 + step]]), pre.cache))
        return torch.stack(logits)

    reference = run(long_embeds, long_pos, None)
    torch.testing.assert_close(run(short_embeds, short_pos, bias), reference, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(run(short_embeds, short_pos, None), reference, atol=1e-3)
