import pytest

from aim_engine.errors import MediaError
from aim_engine.media import MediaLimits, read_image, read_video, sample_frame_indices
from tests.media_samples import encode_audio_only, encode_image, encode_video


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif")])
def test_images_decode_to_rgb(fmt, mime):
    img = read_image(encode_image(fmt), mime)
    assert img.mode == "RGB" and img.size == (64, 48)


@pytest.mark.parametrize("container,codec,mime", [("mp4", "mpeg4", "video/mp4"), ("mp4", "libx264", "video/mp4"),
                                                  ("webm", "libvpx", "video/webm"),
                                                  ("matroska", "mpeg4", "video/x-matroska")])
def test_videos_decode_and_sample_uniformly(container, codec, mime):
    clip = read_video(encode_video(container, codec), mime, num_frames=4)
    frames = clip.frames
    assert clip.fps == pytest.approx(4 / 1.0, rel=0.1)  # 12 frames at 12 fps = 1 s, 4 sampled
    assert len(frames) == 4 and all(f.size == (64, 64) for f in frames)
    # the white square moves right: its column in the sampled frames increases
    cols = [int(__import__("numpy").asarray(f)[12].sum(-1).argmax()) for f in frames]
    assert cols == sorted(cols) and cols[0] < cols[-1]


def test_frame_sampling_indices():
    assert sample_frame_indices(100, 4) == [12, 37, 62, 87]
    assert sample_frame_indices(2, 4) == [0, 0, 1, 1]


@pytest.mark.parametrize("data,mime,reason,message", [
    (b"", "image/png", MediaError.EMPTY, "empty"),
    (b"not an image at all", "image/png", MediaError.CORRUPT, "cannot decode"),
    (encode_image("PNG")[:60], "image/png", MediaError.CORRUPT, "cannot decode"),
    (encode_image("JPEG"), "image/png", MediaError.CORRUPT, "declared type"),
    (encode_image("PNG"), "image/tiff", MediaError.UNSUPPORTED, "unsupported image type"),
])
def test_bad_images(data, mime, reason, message):
    with pytest.raises(MediaError, match=message) as err:
        read_image(data, mime)
    assert err.value.reason == reason


def test_image_limits():
    with pytest.raises(MediaError, match="pixels") as err:
        read_image(encode_image("PNG"), "image/png", MediaLimits(max_pixels=1000))
    assert err.value.reason == MediaError.TOO_LARGE
    with pytest.raises(MediaError, match="bytes") as err:
        read_image(encode_image("PNG"), "image/png", MediaLimits(max_bytes=100))
    assert err.value.reason == MediaError.TOO_LARGE


@pytest.mark.parametrize("data,mime,frames,reason,message", [
    (encode_video(), "video/avi-but-not", 4, MediaError.UNSUPPORTED, "unsupported video type"),
    (b"\x00" * 500, "video/mp4", 4, MediaError.CORRUPT, "cannot decode"),
    (encode_video()[:400], "video/mp4", 4, MediaError.CORRUPT, "video"),
    (encode_audio_only(), "video/x-matroska", 4, MediaError.CORRUPT, "no video stream"),
    (encode_video(), "video/mp4", 65, MediaError.TOO_MANY_FRAMES, "limit is 64"),
    (encode_video(), "video/mp4", 0, MediaError.TOO_MANY_FRAMES, ">= 1"),
    (b"", "video/mp4", 4, MediaError.EMPTY, "empty"),
])
def test_bad_videos(data, mime, frames, reason, message):
    with pytest.raises(MediaError, match=message) as err:
        read_video(data, mime, frames)
    assert err.value.reason == reason


def test_video_pixel_limit():
    with pytest.raises(MediaError, match="pixels") as err:
        read_video(encode_video(), "video/mp4", 2, MediaLimits(max_pixels=64 * 32))
    assert err.value.reason == MediaError.TOO_LARGE


@pytest.mark.parametrize("data,mime", [
    (encode_image("PNG"), "image/png"), (encode_image("JPEG"), "image/jpeg"), (encode_image("GIF"), "image/gif"),
    (encode_image("WEBP"), "image/webp"), (encode_video("mp4", "mpeg4"), "video/mp4"),
    (encode_video("webm", "libvpx"), "video/webm"), (encode_video("matroska", "mpeg4"), "video/x-matroska"),
    (b"hello world, not media", ""),
])
def test_sniff_mime_type(data, mime):
    from aim_engine.mime import sniff_mime_type

    assert sniff_mime_type(data) == mime


# ---- decoding only what is sampled ----------------------------------------------------------------------------
VIDEO_FORMATS = [("mp4", "mpeg4", "video/mp4"), ("mp4", "libx264", "video/mp4"),
                 ("matroska", "mpeg4", "video/x-matroska"), ("webm", "libvpx", "video/webm")]


@pytest.mark.parametrize("container,codec,mime", VIDEO_FORMATS)
@pytest.mark.parametrize("wanted", [3, 8, 64])
def test_sampled_frames_are_exactly_the_frames_at_the_sampled_indices(container, codec, mime, wanted):
    """300 frames that say their index, a keyframe every 10: few samples seek (gaps of 100 frames), many decode
    through; either way each returned frame is the one at its sampled index, as decoding every frame would give."""
    from tests.media_samples import encode_counter_video, frame_index

    clip = read_video(encode_counter_video(container, codec), mime, wanted)
    assert [frame_index(f) for f in clip.frames] == sample_frame_indices(300, wanted)
    assert clip.fps == pytest.approx(wanted / 12.0, rel=0.02)  # 300 frames at 25 fps


def test_frames_are_decoded_at_the_size_the_model_uses():
    from tests.media_samples import encode_counter_video

    sizes = []
    clip = read_video(encode_counter_video(), "video/mp4", 4,
                        frame_size=lambda w, h: sizes.append((w, h)) or (w // 2, h // 2))
    assert sizes == [(64, 32)] and {f.size for f in clip.frames} == {(32, 16)}


def test_the_decoded_bytes_are_budgeted_and_reserved_before_decoding():
    from aim_engine.errors import Cancelled
    from tests.media_samples import encode_counter_video

    data = encode_counter_video()
    need = 8 * 64 * 32 * 3
    with pytest.raises(MediaError, match=f"8 frames of 64x32 take {need} bytes decoded") as err:
        read_video(data, "video/mp4", 8, budget_bytes=need - 1)
    assert err.value.reason == MediaError.TOO_LARGE
    reserved = []
    read_video(data, "video/mp4", 8, budget_bytes=need, reserve=reserved.append)
    assert reserved == [need]

    class Full(Exception):
        pass

    def refuse(nbytes):
        raise Full(nbytes)

    with pytest.raises(Full):  # the caller's error passes through, not turned into "corrupt media"
        read_video(data, "video/mp4", 8, reserve=refuse)
    polls = []
    with pytest.raises(Cancelled):
        read_video(data, "video/mp4", 8, should_stop=lambda: polls.append(1) or True)
    assert len(polls) == 1  # stopped at the first poll, a few frames in


def test_stream_length_limit_is_checked_from_the_metadata():
    from tests.media_samples import encode_counter_video

    with pytest.raises(MediaError, match="300 frames; the limit is 100") as err:
        read_video(encode_counter_video(), "video/mp4", 4, MediaLimits(max_source_frames=100))
    assert err.value.reason == MediaError.TOO_LARGE



# ---- decode work: one pass past one keyframe, a bound on the frames decoded --------------------------------------
class _CountingContainer:
    """A PyAV container that counts the frames its decode() yields: the decode work, seen from outside."""

    def __init__(self, container, counts: list[int]):
        self._container, self._counts = container, counts

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._counts[-1] += 1
            yield frame


@pytest.fixture
def decoded_frames(monkeypatch):
    """A list whose last item counts the frames decoded by the read_video call under way (one item a call)."""
    import av

    counts: list[int] = [0]
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), counts))
    return counts


def _keyframes(data: bytes) -> int:
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return sum(p.is_keyframe for p in container.demux(stream) if p.size)


LONG_GOP_FORMATS = [("mp4", "libx264", "video/mp4"), ("matroska", "libx264", "video/x-matroska")]


@pytest.mark.parametrize("container,codec,mime", LONG_GOP_FORMATS)
@pytest.mark.parametrize("wanted", [8, 16])
def test_a_clip_with_one_keyframe_is_sampled_in_one_pass(container, codec, mime, wanted, decoded_frames):
    """1500 frames after one keyframe: every seek would land on frame 0 (the old decoder decoded 6,004 frames
    for 8 samples, 12,008 for 16); decoding forward reaches the last sampled frame in one pass."""
    from tests.media_samples import encode_counter_video, frame_index

    data = encode_counter_video(container, codec, frames=1500, gop=2000)
    assert _keyframes(data) == 1
    clip = read_video(data, mime, wanted)
    indices = sample_frame_indices(1500, wanted)
    assert [frame_index(f) for f in clip.frames] == indices
    assert decoded_frames[-1] == clip.decoded_frames == indices[-1] + 1  # up to the last sampled frame, once


@pytest.mark.parametrize("container,codec,mime", VIDEO_FORMATS)
def test_a_clip_with_a_short_keyframe_interval_still_seeks(container, codec, mime, decoded_frames):
    """A keyframe every 10 frames: each sampled frame costs at most the 10 frames from the keyframe before it
    (the old decoder went from the start to the first sampled frame, 134 frames for 8 samples of 1500)."""
    from tests.media_samples import encode_counter_video, frame_index

    data = encode_counter_video(container, codec, frames=1500, gop=10)
    clip = read_video(data, mime, 8)
    assert [frame_index(f) for f in clip.frames] == sample_frame_indices(1500, 8)
    assert decoded_frames[-1] == clip.decoded_frames <= 8 * 10


def test_the_decoded_frames_are_refused_before_decoding_where_the_packets_show_them_over_the_limit(decoded_frames):
    from tests.media_samples import encode_counter_video

    data = encode_counter_video("mp4", "libx264", frames=1500, gop=2000)
    reserved = []
    with pytest.raises(MediaError, match="sampling 16 frames from this video [(]1500 frames, 1 keyframe[)] "
                                         "decodes 1454 frames; the request's decoded-frame limit leaves 1000 of "
                                         "1000: ask for fewer frames, send a shorter clip, or re-encode it with "
                                         "more keyframes") as err:
        read_video(data, "video/mp4", 16, MediaLimits(max_decoded_frames=1000), reserve=reserved.append)
    assert err.value.reason == MediaError.TOO_LARGE
    assert decoded_frames == [0] and reserved == []  # refused before a frame was decoded or memory reserved
    # what the request has left, not the whole limit, is what a video may take
    with pytest.raises(MediaError, match="leaves 1453 of 20000"):
        read_video(data, "video/mp4", 16, budget_frames=1453)
    assert read_video(data, "video/mp4", 16, budget_frames=1454).decoded_frames == 1454


def test_a_stream_whose_packets_mislead_the_plan_is_stopped_at_the_limit(monkeypatch, decoded_frames):
    """Packets that claim a keyframe at every frame: the plan decodes 62 frames (47 to the first sampled one,
    then one a seek), but each seek lands on the one real keyframe; decoding stops once past the limit."""
    import aim_engine.media as media
    from tests.media_samples import encode_counter_video

    real_index = media._index_stream

    def lying_index(*args):
        index = real_index(*args)
        return media._StreamIndex(index.packets, list(range(index.packets)))

    monkeypatch.setattr(media, "_index_stream", lying_index)
    data = encode_counter_video("mp4", "libx264", frames=1500, gop=2000)
    with pytest.raises(MediaError, match="decoding this video went past 1000 frames [(]its packets promised 62[)]; "
                                         "the request's decoded-frame limit leaves 1000 of 1000") as err:
        read_video(data, "video/mp4", 16, MediaLimits(max_decoded_frames=1000))
    assert err.value.reason == MediaError.TOO_LARGE
    assert decoded_frames[-1] == 1001


def test_the_decoded_frame_limit_is_one_for_the_whole_request():
    """Two videos of one request share the limit: each fits it alone, the second is refused for what the first
    decoded, before it is decoded."""
    from types import SimpleNamespace

    from aim_engine.prepare import Preparer
    from aim_engine.request import GenerationRequest, TextPart, VideoPart
    from tests.media_samples import encode_counter_video

    data = encode_counter_video("mp4", "libx264", frames=1500, gop=2000)  # 16 sampled: 1454 frames decoded
    adapter = SimpleNamespace(tokenizer=None, language_model=lambda: None, video_frame_size=None,
                              images_independent=True)
    preparer = Preparer(adapter, MediaLimits(max_decoded_frames=2000), num_layers=1)
    one = GenerationRequest([VideoPart(data=data, mime_type="video/mp4", num_frames=16), TextPart("What?")])
    assert len(preparer.read_media(one)[0].frames) == 16
    two = GenerationRequest([VideoPart(data=data, mime_type="video/mp4", num_frames=16)] * 2 + [TextPart("What?")])
    with pytest.raises(MediaError, match="decodes 1454 frames; the request's decoded-frame limit leaves 546 of 2000"):
        preparer.read_media(two)


# ---- image modes, orientation, bombs, animations --------------------------------------------------------------
def _encoded(img, fmt, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_image_modes_become_8_bit_rgb():
    import numpy as np
    from PIL import Image

    cmyk = read_image(_encoded(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"), "image/jpeg")
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[5, 5, 0] > 200 and np.asarray(cmyk)[5, 5, 1] < 60  # red
    deep = Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16))  # 16-bit greyscale, full white
    assert np.asarray(read_image(_encoded(deep, "PNG"), "image/png")).min() == 255
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent black: shows the white background
    assert np.asarray(read_image(_encoded(rgba, "PNG"), "image/png")).min() == 255
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert tuple(np.asarray(read_image(_encoded(palette, "PNG"), "image/png"))[0, 0]) == (0, 0, 255)
    grey = read_image(_encoded(Image.new("L", (20, 10), 7), "WEBP", lossless=True), "image/webp")
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (7, 7, 7)


def test_exif_orientation_is_applied():
    from PIL import Image

    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = read_image(_encoded(img, "JPEG", exif=exif), "image/jpeg")
    assert decoded.size == (20, 40)


def test_a_small_file_that_expands_to_a_huge_image_is_refused_before_decoding():
    from PIL import Image

    bomb = _encoded(Image.new("1", (8000, 6000)), "PNG", optimize=True)  # 48 MP from a few KB
    assert len(bomb) < 100_000
    with pytest.raises(MediaError, match="8000x6000 = 48000000 pixels; the limit is 40000000") as err:
        read_image(bomb, "image/png")
    assert err.value.reason == MediaError.TOO_LARGE


def test_an_animation_with_thousands_of_frames_gives_its_first_frame_quickly():
    from PIL import Image

    frames = [Image.new("P", (8, 8), i % 200) for i in range(3000)]
    for f in frames:
        f.putpalette(list(range(256)) * 3)
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    img = read_image(gif, "image/gif")
    assert img.size == (8, 8) and img.mode == "RGB"
