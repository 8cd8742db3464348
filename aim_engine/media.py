"""Decoding images (Pillow) and videos (PyAV) from bytes, with limits. Every failure is a MediaError
whose message says what was wrong and what the caller can do."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .errors import Cancelled, MediaError
from .mime import IMAGE_MIME_TYPES, VIDEO_MIME_TYPES


@dataclass
class VideoClip:
    """Frames sampled from a video, and how many of them per second of the source (None if unknown)."""

    frames: list[Image.Image]
    fps: float | None


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 64 * 1024 * 1024  # per item, encoded
    max_pixels: int = 40_000_000  # per image / frame of the source (width * height)
    max_frames: int = 64  # frames sampled from one video
    max_video_seconds: float = 3600.0
    max_source_frames: int = 200_000  # frames in one video's stream (what sampling may have to decode through)
    max_decoded_bytes: int = 512 * 1024 * 1024  # one request's decoded pixels held for the model (RGB, 3 B/pixel)
    max_items: int = 64  # images and videos in one request


# Decode-and-discard is cheaper than a seek for short gaps; beyond this many frames to the next sampled one, seek
# to the keyframe before it.
SEEK_GAP_FRAMES = 48
STOP_CHECK_EVERY = 8  # frames decoded between two polls of the caller's should_stop

FrameSize = Callable[[int, int], tuple[int, int]]  # source (width, height) -> size to decode frames at


def rgb_bytes(width: int, height: int, frames: int = 1) -> int:
    """Bytes of decoded RGB pixels: the one formula the media budgets count with."""
    return frames * width * height * 3


def image_info(data: bytes, mime_type: str, limits: MediaLimits = MediaLimits()) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels; the same checks as read_image."""
    with _open_image(data, mime_type, limits) as img:
        return img.size


def read_image(data: bytes, mime_type: str, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """PNG, JPEG, WebP, GIF (first frame) -> RGB image, upright (EXIF orientation applied). Any mode Pillow
    reads (palette, alpha — composited on white —, CMYK, 16-bit, greyscale) is converted to 8-bit RGB."""
    try:
        with _open_image(data, mime_type, limits) as img:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.seek(0)  # animated GIF / WebP: the first frame only (send frames as a video for more)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(MediaError.TOO_LARGE, f"image is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime_type} image ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None


def _open_image(data: bytes, mime_type: str, limits: MediaLimits) -> Image.Image:
    mime = (mime_type or "").lower().strip()
    if mime not in IMAGE_MIME_TYPES:
        raise MediaError(MediaError.UNSUPPORTED,
                         f"unsupported image type {mime_type!r}; use one of {sorted(IMAGE_MIME_TYPES)}")
    _check_bytes(data, limits, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[IMAGE_MIME_TYPES[mime]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(MediaError.TOO_LARGE, f"image is too large to decode safely: {exc}") from None
    except Exception as exc:
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime} image ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None
    w, h = img.size
    if w < 1 or h < 1:
        img.close()
        raise MediaError(MediaError.CORRUPT, f"the image is {w}x{h} pixels")
    if w * h > limits.max_pixels:
        img.close()
        raise MediaError(MediaError.TOO_LARGE, f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(1.0, float(arr.max()))
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video, before any frame is decoded."""

    width: int
    height: int
    frames: int | None  # frames in the stream, when the container says or duration x rate gives it
    seconds: float | None
    rate: float | None  # frames per second of the stream


def read_video(data: bytes, mime_type: str, num_frames: int, limits: MediaLimits = MediaLimits(),
               frame_size: FrameSize | None = None, budget_bytes: int | None = None,
               should_stop: Callable[[], bool] | None = None,
               reserve: Callable[[int], None] | None = None) -> VideoClip:
    """`num_frames` RGB frames sampled uniformly over the video, decoding only what sampling needs.

    The sampled frame indices come from the container's metadata (frame count, or duration x rate); frames are
    decoded in order and dropped unless sampled, with a seek to the keyframe before a sampled frame that is far
    ahead. Only sampled frames are converted to RGB, directly at `frame_size(width, height)` (the size the
    model will use: no larger than the source). Before decoding, the frames' RGB bytes are checked against
    `budget_bytes` (the request's remaining decoded-pixel budget; MediaError when over) and passed to `reserve`
    (the server's memory budget; it may wait or raise). `should_stop` is polled while decoding."""
    import av

    mime = _check_video_request(data, mime_type, num_frames, limits)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(MediaError.CORRUPT, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            info = _video_info(container, stream, limits)
            width, height = frame_size(info.width, info.height) if frame_size else (info.width, info.height)
            _reserve_frames(num_frames, width, height, limits, budget_bytes, reserve)
            total = info.frames
            if total is None:  # no count and no duration in the container: one pass to count, nothing kept
                total = _count_frames(container, stream, limits, should_stop)
                container.seek(0)
            picked, decoded_total = _decode_sampled(container, stream, info, total, num_frames, (width, height),
                                                    should_stop)
            if picked is None:  # the container over-stated its length: sample again over what is really there
                if decoded_total == 0:
                    raise MediaError(MediaError.CORRUPT, "the video contains no decodable frames")
                container.seek(0)
                picked, _ = _decode_sampled(container, stream, replace(info, rate=None), decoded_total, num_frames,
                                            (width, height), should_stop)
    except (MediaError, Cancelled):
        raise
    except _CallerError as wrapped:
        raise wrapped.error from None
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime} video ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None
    if not picked:
        raise MediaError(MediaError.CORRUPT, "the video contains no decodable frames")
    seconds = info.seconds or (total / info.rate if info.rate else None)
    return VideoClip(picked, num_frames / seconds if seconds else None)


def _check_video_request(data: bytes, mime_type: str, num_frames: int, limits: MediaLimits) -> str:
    """The video's MIME type (normalised), once its type, frame count and size are known to be acceptable."""
    mime = (mime_type or "").lower().strip()
    if mime not in VIDEO_MIME_TYPES:
        raise MediaError(MediaError.UNSUPPORTED,
                         f"unsupported video type {mime_type!r}; use one of {sorted(VIDEO_MIME_TYPES)}")
    if num_frames < 1:
        raise MediaError(MediaError.TOO_MANY_FRAMES, f"frame count must be >= 1, got {num_frames}")
    if num_frames > limits.max_frames:
        raise MediaError(MediaError.TOO_MANY_FRAMES,
                         f"{num_frames} frames requested; the limit is {limits.max_frames}")
    _check_bytes(data, limits, "video")
    return mime


def _reserve_frames(num_frames: int, width: int, height: int, limits: MediaLimits, budget_bytes: int | None,
                    reserve: Callable[[int], None] | None) -> None:
    """The sampled frames' RGB bytes, checked against the request's budget and reserved, before any is decoded."""
    need = rgb_bytes(width, height, num_frames)
    if budget_bytes is not None and need > budget_bytes:
        raise MediaError(MediaError.TOO_LARGE,
                         f"{num_frames} frames of {width}x{height} take {need} bytes decoded; the request's "
                         f"decoded-media limit leaves {max(0, budget_bytes)} of {limits.max_decoded_bytes} "
                         "bytes: ask for fewer frames or send smaller media")
    if reserve is not None:
        try:
            reserve(need)
        except BaseException as exc:  # the caller's own error (over budget, cancelled): not the media's
            raise _CallerError(exc) from None


class _CallerError(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _video_info(container, stream, limits: MediaLimits) -> VideoInfo:
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width < 1 or height < 1:
        raise MediaError(MediaError.CORRUPT, "the video stream does not say its frame size")
    if width * height > limits.max_pixels:
        raise MediaError(MediaError.TOO_LARGE,
                         f"video frames are {width}x{height}; the limit is {limits.max_pixels} pixels")
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    if seconds is not None and seconds > limits.max_video_seconds:
        raise MediaError(MediaError.TOO_LARGE,
                         f"video is {seconds:.0f} s long; the limit is {limits.max_video_seconds:.0f} s")
    rate = float(stream.average_rate) if stream.average_rate else None
    frames = int(stream.frames) if stream.frames else None
    if frames is None and seconds and rate:
        frames = max(1, round(seconds * rate))
    if frames is not None and frames > limits.max_source_frames:
        raise MediaError(MediaError.TOO_LARGE,
                         f"video has {frames} frames; the limit is {limits.max_source_frames}")
    return VideoInfo(width, height, frames, seconds, rate)


def _count_frames(container, stream, limits: MediaLimits, should_stop) -> int:
    count = 0
    for _ in container.decode(stream):
        count += 1
        if count > limits.max_source_frames:
            raise MediaError(MediaError.TOO_LARGE, f"video has more than {limits.max_source_frames} frames")
        if should_stop is not None and count % STOP_CHECK_EVERY == 0 and should_stop():
            raise Cancelled()
    return count


def _decode_sampled(container, stream, info: VideoInfo, total: int, wanted: int, size: tuple[int, int],
                    should_stop) -> tuple[list[Image.Image] | None, int]:
    """The frames at the sampled indices, converted at `size`; (None, frames seen) if the stream ends first.
    Frame indices come from presentation timestamps when the stream has a rate (exact after a seek), else from
    counting decoded frames."""
    indices = sample_frame_indices(total, wanted)
    targets = sorted(set(indices))
    tb, rate = stream.time_base, info.rate
    origin = stream.start_time or 0
    can_seek = bool(rate and tb)
    kept: dict[int, Image.Image] = {}
    frames = None
    position = -1  # index of the last frame decoded
    seen = 0
    for target in targets:
        if kept and position >= target:  # the last kept frame already lies at or past this index
            kept[target] = kept[max(kept)]
            continue
        if frames is None or (can_seek and target - position > SEEK_GAP_FRAMES):
            if frames is not None:
                container.seek(origin + int(target / rate / tb), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            seen += 1
            if should_stop is not None and seen % STOP_CHECK_EVERY == 0 and should_stop():
                raise Cancelled()
            if can_seek and frame.pts is not None:
                position = round(float((frame.pts - origin) * tb) * rate)
            else:
                position += 1
            if position >= target:
                kept[target] = frame.reformat(width=size[0], height=size[1], format="rgb24",
                                              interpolation="AREA").to_image()
                break
        else:
            return None, max(seen, position + 1)
    return [kept[i] for i in indices], total


def sample_frame_indices(total: int, wanted: int) -> list[int]:
    """`wanted` indices spread uniformly over `total` frames (centres of equal segments); repeats frames
    when the video is shorter than `wanted`."""
    return [min(total - 1, int((i + 0.5) * total / wanted)) for i in range(wanted)]


def _describe(exc: Exception) -> str:
    """A library exception as a short message, without Python object reprs."""
    text = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_bytes(data: bytes, limits: MediaLimits, what: str) -> None:
    if not data:
        raise MediaError(MediaError.EMPTY, f"the {what} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise MediaError(MediaError.TOO_LARGE,
                         f"the {what} is {len(data)} bytes; the limit is {limits.max_bytes} bytes")

