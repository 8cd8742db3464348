import pytest

from aim_engine.errors import MediaError
from aim_engine.media import MediaLimits, decode_image, decode_video, sample_frame_indices
from tests.media_samples import encode_audio_only, encode_image, encode_video


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                      ("GIF", "image/gif")])
def test_images_decode_to_rgb(fmt, mime):
    img = decode_image(encode_image(fmt), mime)
    assert img.mode == "RGB" and img.size == (64, 48)


@pytest.mark.parametrize("container,codec,mime", [("mp4", "mpeg4", "video/mp4"), ("mp4", "libx264", "video/mp4"),
                                                  ("webm", "libvpx", "video/webm"),
                                                  ("matroska", "mpeg4", "video/x-matroska")])
def test_videos_decode_and_sample_uniformly(container, codec, mime):
    clip = decode_video(encode_video(container, codec), mime, num_frames=4)
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
        decode_image(data, mime)
    assert err.value.reason == reason


def test_image_limits():
    with pytest.raises(MediaError, match="pixels") as err:
        decode_image(encode_image("PNG"), "image/png", MediaLimits(max_pixels=1000))
    assert err.value.reason == MediaError.TOO_LARGE
    with pytest.raises(MediaError, match="bytes") as err:
        decode_image(encode_image("PNG"), "image/png", MediaLimits(max_bytes=100))
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
        decode_video(data, mime, frames)
    assert err.value.reason == reason


def test_video_pixel_limit():
    with pytest.raises(MediaError, match="pixels") as err:
        decode_video(encode_video(), "video/mp4", 2, MediaLimits(max_pixels=64 * 32))
    assert err.value.reason == MediaError.TOO_LARGE


@pytest.mark.parametrize("data,mime", [
    (encode_image("PNG"), "image/png"), (encode_image("JPEG"), "image/jpeg"), (encode_image("GIF"), "image/gif"),
    (encode_image("WEBP"), "image/webp"), (encode_video("mp4", "mpeg4"), "video/mp4"),
    (encode_video("webm", "libvpx"), "video/webm"), (encode_video("matroska", "mpeg4"), "video/x-matroska"),
    (b"hello world, not media", ""),
])
def test_sniff_mime_type(data, mime):
    from aim_engine.media import sniff_mime_type

    assert sniff_mime_type(data) == mime
