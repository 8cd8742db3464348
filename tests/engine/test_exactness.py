"""The empty plan is the untouched model: same greedy tokens and logits (fp32, 1e-5) as transformers'
own `generate`, for each family, with images and video."""

from __future__ import annotations

import pytest
import torch

from aim_engine import GenerationRequest, ImagePart, ReductionPlan, SamplingParams, TextPart, VideoPart
from aim_engine.decoder import decode_step, prefill

from tests.conftest import (FAMILIES, TEST_DTYPE, VIDEO_FAMILIES, assert_same_greedy, logit_tolerance, random_frames,
                            random_image)

STEPS = 12


def hf_inputs(engine, request):
    """The same request as transformers' generate takes it: expanded placeholders + pixel tensors."""
    adapter, tok = engine.adapter, engine.tokenizer
    parts = engine.preparer.read_media(request)
    media = engine.preparer.encode_media(parts)
    ids = tok(engine.preparer.render_prompt(request), add_special_tokens=False)["input_ids"]
    counts = iter(rows for m in media for rows in adapter.placeholder_spans(m))
    expanded = []
    for t in ids:
        expanded += [t] * next(counts) if t in (adapter.image_token_id, adapter.video_token_id) else [t]
    input_ids = torch.tensor([expanded])
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    images = [p.image for p in parts if isinstance(p, ImagePart)]
    videos = [p for p in parts if isinstance(p, VideoPart)]
    family = adapter.family
    if images:
        pix = adapter.image_processor(images=images, return_tensors="pt")
        kwargs["pixel_values"] = pix["pixel_values"]
        if family in ("llava_onevision", "llava_next"):
            kwargs["image_sizes"] = pix["image_sizes"]
        if family == "llava_onevision":
            kwargs["batch_num_images"] = torch.tensor([len(images)])
        if family.startswith("qwen"):
            kwargs["image_grid_thw"] = pix["image_grid_thw"]
    if videos and family == "llava":
        # our LLaVA video = its frames as images at the frame size, behind image placeholders
        side = adapter._frame_size()
        kwargs["pixel_values"] = adapter.normalize_frames(videos[0].frames, (side, side))
        input_ids[input_ids == adapter.video_token_id] = adapter.image_token_id
    elif videos and family == "internvl":  # every frame one tile, behind its own <img> ... </img>
        kwargs["pixel_values"] = adapter.normalize_frames(videos[0].frames, (adapter._side, adapter._side))
    elif videos:
        if family == "llava_onevision":
            size = adapter.config.vision_config.image_size
            kwargs["pixel_values_videos"] = adapter.normalize_frames(videos[0].frames, (size, size))[None]
        else:
            patches, grid = adapter.video_pixels(videos[0].frames)
            kwargs["pixel_values_videos"] = patches
            kwargs["video_grid_thw"] = grid[None]
        if family == "qwen2_5_vl":  # seconds per temporal patch of 2 frames
            kwargs["second_per_grid_ts"] = torch.tensor([2 / videos[0].fps])
    if family == "gemma3":  # its image tokens attend to each other both ways: the processor's token types say where
        kwargs["token_type_ids"] = (input_ids == adapter.image_token_id).long()
    if family.startswith("qwen"):
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == adapter.image_token_id] = 1
        types[input_ids == adapter.video_token_id] = 2
        kwargs["mm_token_type_ids"] = types
    model = engine.adapter.model
    return {k: v.to(model.device, model.dtype if v.is_floating_point() else v.dtype) for k, v in kwargs.items()}


def engine_greedy_logits(engine, request, plan, steps):
    prepared = engine.prepare(request, plan)
    pre = prefill(engine.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, plan, steps,
                  key_bias=prepared.key_bias, deepstack=prepared.deepstack,
                  blocks=prepared.blocks)
    logits, tokens = [pre.logits], []
    for step in range(steps - 1):
        tokens.append(int(torch.argmax(logits[-1])))
        token = torch.tensor([[tokens[-1]]], device=engine.adapter.device)
        logits.append(decode_step(engine.lm, token, engine.preparer.decode_positions(prepared, step), pre.cache))
    tokens.append(int(torch.argmax(logits[-1])))
    return torch.stack(logits), tokens


def requests_for(family):
    yield "image", [ImagePart(image=random_image(1)), TextPart("Describe the picture.")]
    yield "two-images", [TextPart("Compare"), ImagePart(image=random_image(2)), TextPart("and"),
                         ImagePart(image=random_image(3, (30, 30))), TextPart("please.")]
    if family in VIDEO_FAMILIES:
        yield "video", [VideoPart(frames=random_frames(4, 4), fps=8.0), TextPart("What happens?")]


CASES = [(f, name) for f in FAMILIES for name, _ in requests_for(f)]


@pytest.mark.parametrize("family,case", CASES)
def test_empty_plan_matches_transformers_generate(engine_for, family, case):
    engine = engine_for(family)
    parts = dict(requests_for(family))[case]
    request = GenerationRequest(parts, SamplingParams(max_new_tokens=STEPS))

    with torch.inference_mode():
        ref = engine.adapter.model.generate(**hf_inputs(engine, request), max_new_tokens=STEPS, do_sample=False,
                                            output_logits=True, return_dict_in_generate=True,
                                            eos_token_id=None, pad_token_id=engine.tokenizer.pad_token_id)
    ref_logits = torch.cat(ref.logits).float()
    ref_tokens = ref.sequences[0, -STEPS:].tolist()

    logits, tokens = engine_greedy_logits(engine, request, ReductionPlan(), STEPS)
    assert_same_greedy(tokens, logits, ref_tokens, ref_logits, logit_tolerance(1e-5))

    # the public path produces the same tokens (up to an EOS, which generate() does not return)
    result = engine.generate(request)
    if TEST_DTYPE == torch.float32:
        assert result.token_ids == ref_tokens[: len(result.token_ids)]
    assert result.stats.prefill_flops == result.stats.prefill_flops_baseline
