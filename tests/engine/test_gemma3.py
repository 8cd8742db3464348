"""What is particular to Gemma 3: image tokens that attend to each other both ways, sliding-window layers measured
in positions, and their FLOPs. (Exactness against transformers, pruning against a masked reference, batching,
caching and costs run for it with every family.)"""

from __future__ import annotations

import dataclasses

import torch

from aim_engine import GenerationRequest, ImagePart, ReductionPlan, TextPart
from aim_engine.decoder import prefill
from aim_engine.flops import LLMShape, decode_step_flops, layer_prefill_flops
from tests.conftest import random_image


def _request():
    return GenerationRequest([TextPart("Compare"), ImagePart(image=random_image(40)), TextPart("and"),
                              ImagePart(image=random_image(41, (30, 30))), TextPart("please, in a few words.")])


def test_an_image_is_written_as_its_processor_writes_it(engine_for):
    engine = engine_for("gemma3")
    prompt = engine.preparer.render_prompt(_request())
    assert "Compare\n\n<start_of_image><image_soft_token><end_of_image>\n\nand\n\n<start_of_image>" in prompt
    prepared = engine.prepare(_request(), ReductionPlan())
    assert int(prepared.is_visual.sum()) == 2 * engine.adapter.config.mm_tokens_per_image


def test_each_image_is_one_bidirectional_block_and_merging_keeps_it_so(engine_for):
    engine = engine_for("gemma3")
    for plan in (ReductionPlan(), ReductionPlan(merge_retention=0.25)):
        prepared = engine.prepare(_request(), plan)
        blocks = prepared.blocks
        assert torch.equal(blocks >= 0, prepared.is_visual)  # text is in no block
        ids = blocks[prepared.is_visual].unique_consecutive()
        assert len(ids) == 2 and ids[0] != ids[1]  # one per image, its tokens contiguous
        per_image = engine.adapter.config.mm_tokens_per_image
        assert [int((blocks == b).sum()) for b in ids] == [plan.merge_target(per_image)] * 2


def test_blocks_and_windows_change_what_the_model_computes(engine_for):
    """Both rules are live in the tiny model: without the image blocks, or without the sliding windows, the
    prefill's logits differ (the exactness test shows that with both they equal transformers')."""
    engine = engine_for("gemma3")
    prepared = engine.prepare(_request(), ReductionPlan())
    span = int(prepared.position_ids.max() - prepared.position_ids.min())
    assert span >= engine.lm.sliding_window  # the window binds in this prompt

    def logits(lm, blocks):
        return prefill(lm, prepared.embeds, prepared.position_ids, prepared.is_visual, ReductionPlan(), 1,
                       blocks=blocks).logits

    both = logits(engine.lm, prepared.blocks)
    assert not torch.allclose(both, logits(engine.lm, None), atol=1e-3)
    unwindowed = dataclasses.replace(engine.lm, sliding_window=10**6)
    assert not torch.allclose(both, logits(unwindowed, prepared.blocks), atol=1e-3)


def test_a_sliding_layer_counts_attention_over_its_window():
    """Gemma-3-4B's text model: 34 layers, every sixth global, the rest over 1024 positions."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=256, sliding_window=1024, vocab_size=262208)
    shape = LLMShape.from_config(config)
    assert shape.sliding_layers == frozenset(l for l in range(34) if (l + 1) % 6) and shape.sliding_window == 1024
    n, d, a, kv = 1500, 2560, 2048, 1024
    linear = 2 * n * (d * a + a * d) + 2 * n * 2 * d * kv + 2 * n * 3 * d * 10240 + 17 * n * d
    assert layer_prefill_flops(shape, n, layer=5) == linear + 4 * n * n * a + 5 * 8 * n * n  # global: all keys
    assert layer_prefill_flops(shape, n, layer=0) == linear + 4 * n * 1024 * a + 5 * 8 * n * 1024  # the window
    assert layer_prefill_flops(shape, 500, layer=0) == layer_prefill_flops(shape, 500, layer=5)  # inside it
    context = [3000] * 34
    windowed = sum(4 * (1024 if l in shape.sliding_layers else 3000) * a + 5 * 8 * (1024 if l in shape.sliding_layers
                   else 3000) for l in range(34))
    full = dataclasses.replace(shape, sliding_layers=frozenset())
    assert decode_step_flops(full, context) - decode_step_flops(shape, context) == \
        sum(4 * 3000 * a + 5 * 8 * 3000 for _ in range(34)) - windowed


def test_a_prefix_that_ends_inside_an_image_is_keyed_by_the_whole_image(engine_for):
    """A reused prefix's K/V at an image token depend on the image's later tokens too (they attend both ways): two
    prompts whose images differ only after the prefix's end must not share it."""
    from tests.engine.test_prefix_cache import with_caches

    cache = with_caches(engine_for("gemma3")).prefix_cache
    n, d = 40, 64
    embeds = torch.randn(1, n, d)
    positions = torch.arange(n)[None]
    is_visual = torch.zeros(n, dtype=torch.bool)
    is_visual[10:36] = True  # one image; the prefix is the first 32 tokens (two blocks of 16), inside it
    blocks = torch.where(is_visual, 0, -1)
    other = embeds.clone()
    other[0, 34] += 1.0  # the same image up to the prefix's end, different after it
    key = cache.key_for(embeds, positions, is_visual, None, blocks=blocks)
    assert key.tokens == 32
    assert key != cache.key_for(other, positions, is_visual, None, blocks=blocks)
    # causal attention only (no blocks): the prefix's K/V do not depend on token 34, and the keys agree
    assert cache.key_for(embeds, positions, is_visual, None) == cache.key_for(other, positions, is_visual, None)
