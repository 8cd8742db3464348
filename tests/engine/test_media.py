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
