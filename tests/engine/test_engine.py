"""The engine's public behaviour: streaming, sampling, stop conditions, stats and request errors."""

import pytest
import torch

from aim_engine import (GenerationRequest, ImagePart, MediaError, PlanError, ReductionPlan, RequestError,
                        SamplingParams, TextPart, TokenDelta, VideoPart)
from aim_engine.errors import GenerationError
from tests.conftest import FAMILIES, random_frames, random_image
from tests.media_samples import encode_image, encode_video


def video_request(**sampling):
    return GenerationRequest([VideoPart(data=encode_video(frames=16), mime_type="video/mp4", num_frames=6),
                              TextPart("What moves?")], SamplingParams(**sampling))


def test_stream_deltas_concatenate_to_the_final_text(engine_for):
    engine = engine_for("llava_onevision")
    events = list(engine.stream(video_request(max_new_tokens=20)))
    result = events[-1]
    deltas = [e for e in events[:-1] if isinstance(e, TokenDelta)]
    assert len(events) - 1 == len(deltas) and deltas
    assert "".join(d.text for d in deltas) == result.text
    assert result.finish_reason in ("length", "stop") and result.stats.completion_tokens == len(result.token_ids)


def test_sampling_is_reproducible_by_seed_and_differs_from_greedy(engine_for):
    engine = engine_for("llava_onevision")
    a = engine.generate(video_request(max_new_tokens=16, temperature=1.5, seed=7))
    b = engine.generate(video_request(max_new_tokens=16, temperature=1.5, seed=7))
    c = engine.generate(video_request(max_new_tokens=16, temperature=1.5, seed=8))
    greedy = engine.generate(video_request(max_new_tokens=16))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids
    # top_p that keeps only the single most likely token is greedy
    nucleus = engine.generate(video_request(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=3))
    assert nucleus.token_ids == greedy.token_ids


def test_an_unseeded_sampled_request_leaves_torchs_global_generator_alone(engine_for):
    """Its own seed comes from the OS: reseeding torch's global generator (torch.seed()) would change what every
    other user of it in the process draws."""
    engine = engine_for("llava_onevision")
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    engine.generate(video_request(max_new_tokens=4, temperature=1.0))
    assert torch.initial_seed() == 1234 and torch.equal(torch.rand(3), expected)


def test_stop_string_ends_generation_and_is_not_returned(engine_for):
    engine = engine_for("llava_onevision")
    full = engine.generate(video_request(max_new_tokens=24))
    stop = full.text[5:7]
    assert len(stop) == 2
    result = engine.generate(video_request(max_new_tokens=24, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]


def test_stop_strings_are_bounded_in_count_and_length():
    from aim_engine.generation import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams

    SamplingParams(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS)))
    SamplingParams(stop=("x" * MAX_STOP_CHARS,))
    with pytest.raises(GenerationError, match=f"{MAX_STOP_STRINGS + 1} stop strings; the limit is"):
        SamplingParams(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1)))
    with pytest.raises(GenerationError, match=f"{MAX_STOP_CHARS + 1} characters; the limit is"):
        SamplingParams(stop=("x" * (MAX_STOP_CHARS + 1),))


def test_cancellation_stops_at_the_next_decode_step(engine_for):
    engine = engine_for("llava_onevision")
    request = video_request(max_new_tokens=50, ignore_eos=True)
    seen = []
    stop_after = 3
    for event in engine.stream(request, should_stop=lambda: len(seen) >= stop_after):
        if isinstance(event, TokenDelta):
            seen.append(event)
        result = event
    # the stop is seen before the next decode step: no token after the one whose text made it true
    assert result.finish_reason == "cancelled" and len(seen) == stop_after
    assert result.token_ids[-1] == seen[-1].token_id and len(result.token_ids) < 50
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


def test_cancellation_between_prefill_layers_frees_the_kv_at_once(engine_for):
    engine = engine_for("llava_onevision", layers=6, image_size=64)
    polls = []
    result = engine.generate(video_request(max_new_tokens=8),
                             should_stop=lambda: polls.append(engine.pool.used_blocks)
                             or sum(1 for used in polls if used) >= 2)
    assert result.finish_reason == "cancelled" and result.token_ids == []
    assert polls[-1] > 0  # it held KV of its first layers when it stopped
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


def test_cancellation_inside_the_vision_tower(engine_for):
    """should_stop is polled before each block of the vision tower: a request cancelled there stops before the
    tower's last block, and the LLM never runs."""
    engine = engine_for("llava_onevision", layers=6, image_size=64)
    blocks = [b for m in engine.adapter.vision_tower().modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    assert len(blocks) >= 2
    last_ran = []
    handle = blocks[-1].register_forward_hook(lambda *a: last_ran.append(1))
    polls = []
    try:
        result = engine.generate(video_request(max_new_tokens=8),
                                 should_stop=lambda: polls.append(engine.pool.used_blocks) or len(polls) >= 3)
    finally:
        handle.remove()
    assert result.finish_reason == "cancelled" and result.token_ids == []
    assert last_ran == [] and not any(polls)
    assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0


def test_stats_account_for_the_plan(engine_for):
    engine = engine_for("llava_onevision", layers=6, image_size=64)
    full = engine.generate(video_request(max_new_tokens=4))
    plan = ReductionPlan(merge_retention=0.25, prune_start=2, prune_end=5)
    cut = engine.generate(video_request(max_new_tokens=4), plan)
    s, c = full.stats, cut.stats
    assert s.visual_tokens_in == c.visual_tokens_in == 6 * 16 + 1
    assert s.visual_tokens_merged == s.visual_tokens_in and c.visual_tokens_merged == 6 * 4 + 1
    assert c.visual_tokens_per_layer == plan.visual_tokens_per_layer(c.visual_tokens_merged, 6)
    assert c.prefill_flops_baseline == s.prefill_flops_baseline == s.prefill_flops
    assert c.prefill_flops < c.prefill_flops_baseline and 0 < c.saved_fraction < 1
    assert c.kv_cache_bytes < s.kv_cache_bytes
    assert c.vision_flops == s.vision_flops > 0  # the encoder is not reduced
    assert c.retention == pytest.approx(25 / 97)
    t = c.timings
    assert t.total_s >= t.ttft_s >= t.prefill_s > 0 and t.media_s > 0 and t.vision_s > 0


def test_image_bytes_end_to_end_for_each_family(engine_for):
    for family in FAMILIES:
        engine = engine_for(family)
        request = GenerationRequest([ImagePart(data=encode_image("JPEG"), mime_type="image/jpeg"),
                                     TextPart("What is it?")], SamplingParams(max_new_tokens=3))
        result = engine.generate(request, engine.default_plan())
        assert result.stats.visual_tokens_merged < result.stats.visual_tokens_in


@pytest.mark.parametrize("parts,error,message", [
    ([ImagePart(image=random_image(0))], RequestError, "no text"),
    ([TextPart("   ")], RequestError, "no text"),
    ([TextPart("two <image> here"), ImagePart(image=random_image(0))], RequestError, "placeholder"),
    ([ImagePart(data=b"garbage", mime_type="image/png"), TextPart("hi")], MediaError, "cannot decode"),
    ([ImagePart(), TextPart("hi")], RequestError, "neither bytes"),
    ([VideoPart(frames=[]), TextPart("hi")], RequestError, "empty list of frames"),
    ([VideoPart(frames=random_frames(0, 65)), TextPart("hi")], RequestError, "limit is 64"),
])
def test_bad_requests_raise_typed_errors(engine_for, parts, error, message):
    with pytest.raises(error, match=message):
        engine_for("llava_onevision").generate(GenerationRequest(parts))


@pytest.mark.parametrize("family,text", [("internvl", "see <video> here"), ("internvl", "an <img> tag"),
                                         ("gemma3", "<start_of_image>"), ("qwen3_vl", "a <|vision_start|>"),
                                         ("qwen2_vl", "<|image_pad|>")])
def test_text_with_a_familys_media_tokens_is_refused_before_it_can_misplace_media(engine_for, family, text):
    """A family's media delimiters in the text would be read as structure (InternVL's frames would go where the
    text's <video> is, with the placeholder count still right): refused, for the text and the system prompt."""
    engine = engine_for(family)
    for request in (GenerationRequest([TextPart(text), ImagePart(image=random_image(0))]),
                    GenerationRequest([ImagePart(image=random_image(0)), TextPart("What?")], system=text)):
        with pytest.raises(RequestError, match="placeholder tokens"):
            engine.generate(request)


def test_video_to_an_image_only_family_is_a_request_error(engine_for):
    request = GenerationRequest([VideoPart(frames=random_frames(0, 2)), TextPart("hi")])
    with pytest.raises(RequestError, match="does not accept video"):
        engine_for("llava").generate(request)


def test_plan_beyond_the_model_depth_is_rejected(engine_for):
    request = GenerationRequest([TextPart("hi")])
    with pytest.raises(PlanError, match="beyond the model"):
        engine_for("llava").generate(request, ReductionPlan(prune_start=10, prune_end=12))


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0),
                                    dict(top_p=1.5), dict(stop=("",))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)


def test_text_only_prompt_works(engine_for):
    result = engine_for("qwen2_vl").generate(GenerationRequest([TextPart("Hello")], SamplingParams(max_new_tokens=3)),
                                             ReductionPlan(merge_retention=0.5, prune_start=1, prune_end=3))
    assert result.stats.visual_tokens_in == 0 and result.stats.saved_fraction == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", [
    ReductionPlan(), ReductionPlan(merge_retention=0.25, prune_start=1, prune_end=3),
    ReductionPlan(merge_retention=0.3, reducer="pool"), ReductionPlan(merge_retention=0.3, reducer="evs"),
    ReductionPlan(merge_retention=0.3, reducer="vidcom2", prune_start=2, prune_end=3),
    ReductionPlan(merge_retention=0.3, reducer="fastvid", proportional_attention=True),
    ReductionPlan(prune_stages=((1, 0.5), (2, 0.25)), importance="last_token"),
    ReductionPlan(merge_retention=0.3, reducer="holitom", prune_stages=((2, 0.5),), importance="last_token",
                  merge_pruned=True),
    ReductionPlan(merge_retention=0.3, reducer="holitom", prune_start=1, prune_end=3, proportional_attention=True),
], ids=["none", "aim", "pool", "evs", "vidcom2+aim-pruning", "fastvid", "staged", "holitom", "holitom+aim-pruning"])
def test_estimate_matches_what_generate_spends(engine_for, family, plan):
    engine = engine_for(family)
    parts = [ImagePart(image=random_image(21, (40, 70))), TextPart("and"), ImagePart(image=random_image(22)),
             TextPart("?")]
    if engine.adapter.supports_video:
        parts += [VideoPart(frames=random_frames(23, 4)), TextPart("Describe all.")]
    for request in (GenerationRequest(parts[:1] + parts[3:4]), GenerationRequest(parts)):  # one image; everything
        estimate = engine.estimate(request, plan)
        stats = engine.generate(GenerationRequest(request.parts, SamplingParams(max_new_tokens=1)), plan).stats
        assert (estimate.visual_tokens_in, estimate.visual_tokens_merged) == \
            (stats.visual_tokens_in, stats.visual_tokens_merged)
        assert estimate.visual_tokens_per_layer == stats.visual_tokens_per_layer
        assert estimate.prefill_flops == stats.prefill_flops
        assert estimate.prefill_flops_baseline == stats.prefill_flops_baseline


# odd sizes, very wide, very tall, tiny, and larger than the processor's pixel limit (array shapes: height, width)
ESTIMATE_IMAGE_SIZES = [(37, 53), (8, 300), (300, 9), (2, 3), (97, 131)]
ESTIMATE_FRAME_COUNTS = [1, 2, 3, 5]  # odd counts against Qwen's temporal patch of 2
ESTIMATE_FRAME_SIZES = [(37, 53), (8, 120)]
PIXEL_WORK = ("__call__", "preprocess", "_preprocess", "resize", "rescale", "normalize", "center_crop",
              "crop_image_to_patches", "get_image_patches", "patchify", "pad_to_square")


class ShapesOnly:
    """An image processor whose configuration reads as the real one's, and which raises on any pixel work."""

    def __init__(self, processor):
        self._processor = processor

    def __call__(self, *args, **kwargs):
        raise AssertionError("estimation ran the image processor")

    def __getattr__(self, name):
        if name in PIXEL_WORK:
            raise AssertionError(f"estimation called the image processor's {name}")
        return getattr(self._processor, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_estimated_groups_equal_the_encoded_ones_from_the_sizes_alone(engine_for, family, monkeypatch):
    """Per image and video, the merge groups estimation counts are the ones encoding produces, computed without the
    image processor or normalising a frame (Qwen's estimate once held every pixel as float32 patches)."""
    adapter = engine_for(family).adapter
    images = [random_image(30 + i, size) for i, size in enumerate(ESTIMATE_IMAGE_SIZES)]
    batches = [[image] for image in images] + [images]  # alone (LLaVA-OneVision: with crops) and all together
    clips = ([random_frames(40 + count, count, size) for count in ESTIMATE_FRAME_COUNTS
              for size in ESTIMATE_FRAME_SIZES] if adapter.supports_video else [])
    encoded_images = [[media.shape for media in adapter.encode_images(batch)] for batch in batches]
    encoded_videos = [adapter.encode_video(frames).shape for frames in clips]

    def no_normalising(*args, **kwargs):
        raise AssertionError("estimation normalised video frames")

    monkeypatch.setattr(adapter, "image_processor", ShapesOnly(adapter.image_processor))
    monkeypatch.setattr(adapter, "normalize_frames", no_normalising)
    for batch, encoded in zip(batches, encoded_images):
        assert adapter.estimate_image_groups(batch) == encoded, [image.size for image in batch]
    for frames, encoded in zip(clips, encoded_videos):
        assert adapter.estimate_video_groups(frames) == encoded, (len(frames), frames[0].size)


def test_build_tiny_offers_every_tiny_family():
    from aim_engine.tiny import BUILDERS
    from cli.engine import TINY_FAMILIES

    assert sorted(TINY_FAMILIES) == sorted(BUILDERS)
