"""What is particular to Qwen3-VL: a video's temporal patches with their timestamps as text between them, DeepStack
levels reduced with the features, and what merging and pruning may and may not do to either. (Exactness against
transformers, batching, caching and costs run for it with every family.)"""

from __future__ import annotations

import torch

from aim_engine import GenerationRequest, ImagePart, ReductionPlan, TextPart, VideoPart
from aim_engine.decoder import prefill
from aim_engine.merging import merged_rows
from aim_engine.methods import REDUCERS
from tests.conftest import random_frames, random_image


def _video_request(frames: int = 6, fps: float | None = 4.0):
    return GenerationRequest([ImagePart(image=random_image(30, (32, 48))), TextPart("then"),
                              VideoPart(frames=random_frames(31, frames), fps=fps), TextPart("What happens?")])


def test_timestamps_are_those_of_qwen3_vl_s_own_processor(engine_for):
    from transformers import Qwen3VLProcessor

    adapter = engine_for("qwen3_vl").adapter
    for frames, fps in [(6, 4.0), (5, 2.0), (1, 30.0), (16, 1.5)]:
        # its processor's rule, given the sampled frames' indices and their rate (it reads no other state)
        expected = Qwen3VLProcessor._calculate_timestamps(None, list(range(frames)), fps, 2)
        assert adapter.video_timestamps(frames, fps) == expected
    assert adapter.video_timestamps(4, None) == adapter.video_timestamps(4, 2.0)  # no rate given: 2 fps


def test_a_video_is_written_as_timestamped_temporal_patches(engine_for):
    engine = engine_for("qwen3_vl")
    prompt = engine.preparer.render_prompt(_video_request())
    # 6 frames at 4 fps: temporal patches of frames (0, 1), (2, 3), (4, 5) at 0.125 s, 0.625 s, 1.125 s; the
    # template's own <|vision_start|><|video_pad|><|vision_end|> is replaced, as the model was trained
    assert ("then<0.1 seconds><|vision_start|><|video_pad|><|vision_end|><0.6 seconds><|vision_start|><|video_pad|>"
            "<|vision_end|><1.1 seconds><|vision_start|><|video_pad|><|vision_end|>What happens?") in prompt
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1  # an image is one placeholder
    # from the encoded items (a cache hit's) the same
    media = engine.preparer.encode_media(engine.preparer.read_media(_video_request()))
    assert engine.preparer.render_prompt(_video_request(), media) == prompt


def test_each_temporal_patch_keeps_a_token_and_its_own_time(engine_for):
    engine = engine_for("qwen3_vl")
    for plan in (ReductionPlan(), ReductionPlan(merge_retention=0.01),
                 ReductionPlan(merge_retention=0.01, reducer="vidcom2")):
        prepared = engine.prepare(_video_request(), plan)
        video = prepared.media[1]
        patches = int(video.grid_thw[0])
        t = prepared.position_ids[0, 0][prepared.is_visual]  # the temporal position of every visual token
        assert len(set(t.tolist())) == 1 + patches  # the image's one, and every temporal patch's own
        if plan.merges and plan.reducer == "merge":
            assert int(prepared.is_visual.sum()) == 1 + patches  # one token each (and one for the image)


def test_pruning_never_touches_the_timestamps(engine_for):
    engine = engine_for("qwen3_vl", layers=6)
    plan = ReductionPlan(prune_start=1, prune_end=4, importance="text")  # every visual token gone by layer 3
    request = _video_request()
    prepared = engine.prepare(request, plan)
    ids = engine.tokenizer(engine.preparer.render_prompt(request, prepared.media), add_special_tokens=False)
    text_positions = torch.nonzero(~prepared.is_visual).flatten()
    pre = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, plan, 1, record_kept=True,
                  deepstack=prepared.deepstack)
    assert pre.visual_per_layer[-1] == 0
    for kept in pre.kept_per_layer:
        assert torch.isin(text_positions, kept).all()
    # the timestamps are among those text tokens: "seconds>" three times in what every layer keeps
    text = engine.tokenizer.decode(torch.tensor(ids["input_ids"])[~torch.isin(
        torch.tensor(ids["input_ids"]), torch.tensor([engine.adapter.image_token_id, engine.adapter.video_token_id]))])
    assert text.count(" seconds>") == 3 and int((~prepared.is_visual).sum()) == len(engine.tokenizer(
        text, add_special_tokens=False)["input_ids"])


def test_deepstack_levels_are_reduced_by_the_features_own_merge(engine_for):
    engine = engine_for("qwen3_vl")
    request = _video_request()
    media = engine.preparer.encode_media(engine.preparer.read_media(request))
    levels = len(engine.adapter.config.vision_config.deepstack_visual_indexes)
    for item in media:
        assert item.deepstack.shape == (levels, *item.features.shape)
    for reducer in REDUCERS:
        plan = ReductionPlan(merge_retention=0.3, reducer=reducer)
        prepared = engine.preparer.prepare(request, plan, media=media)
        visual = int(prepared.is_visual.sum())
        assert prepared.deepstack.shape == (levels, visual, item.features.shape[1])
        # the item's rows, reduced as its features were, in prompt order
        expected = torch.cat([merged_rows(REDUCERS[reducer].reduce(m.features, m.groups, plan.merge_target),
                                          m.deepstack) for m in media], dim=1)
        torch.testing.assert_close(prepared.deepstack, expected)
    # and a level changes what the model computes: without it the logits differ
    prepared = engine.preparer.prepare(request, ReductionPlan(), media=media)
    with_levels = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, ReductionPlan(), 1,
                          deepstack=prepared.deepstack).logits
    without = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, ReductionPlan(), 1).logits
    assert not torch.allclose(with_levels, without, atol=1e-3)
