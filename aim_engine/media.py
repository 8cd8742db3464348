"""Decoding images (Pillow) and videos (PyAV) from bytes, with limits. Every failure is a MediaError
whose message says what was wrong and what the caller can do."""

from __future__ import annotations

import bisect
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
    decoded_frames: int = 0  # frames the decoder produced to sample them (what the request's decode limit counts)


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 64 * 1024 * 1024  # per item, encoded
    max_pixels: int = 40_000_000  # per image / frame of the source (width * height)
    max_frames: int = 64  # frames sampled from one video
    max_video_seconds: float = 3600.0
    max_source_frames: int = 200_000  # frames (packets) in one video's stream: what its index pass reads through
    max_decoded_bytes: int = 512 * 1024 * 1024  # one request's decoded pixels held for the model (RGB, 3 B/pixel)
    # Frames decoded for one request, summed over its videos: the decode work, which the bytes above do not bound
    # (a clip with one keyframe makes every sampled frame cost a decode from its start). 64 frames sampled from a
    # stream with x264's default keyframe interval (250) decode at most 64 x 250 = 16,000 frames, and a clip
    # with one keyframe is sampled in one pass up to ~11 minutes at 30 fps; 20,000 frames of 1080p H.264 take
    # ~15 s on 2 cores even for the easy test clip (~1,400 fps), so more is refused before decoding starts.
    max_decoded_frames: int = 20_000
    max_items: int = 64  # images and videos in one request


# Decode-and-discard is cheaper than a seek for short gaps: seek to the keyframe before a sampled frame only when
# that skips more than this many frames the decoder would otherwise go through.
SEEK_GAP_FRAMES = 48
STOP_CHECK_EVERY = 8  # frames decoded between two polls of the caller's should_stop
STOP_CHECK_EVERY_PACKETS = 256  # packets read (not decoded: far cheaper) between two polls, in the index pass

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


def video_decoded_bytes(data: bytes, mime_type: str, num_frames: int, limits: MediaLimits = MediaLimits(),
                        frame_size: FrameSize | None = None) -> int:
    """The RGB bytes `read_video` holds for `num_frames` frames of this video, from its container's header alone
    (nothing decoded): what a server reserves before decoding. The header's checks are read_video's."""
    import av

    mime = _check_video_request(data, mime_type, num_frames, limits)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(MediaError.CORRUPT, "the file has no video stream")
            info = _video_info(container, container.streams.video[0], limits)
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime} video ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None
    width, height = frame_size(info.width, info.height) if frame_size else (info.width, info.height)
    return rgb_bytes(width, height, num_frames)


def read_video(data: bytes, mime_type: str, num_frames: int, limits: MediaLimits = MediaLimits(),
               frame_size: FrameSize | None = None, budget_bytes: int | None = None,
               should_stop: Callable[[], bool] | None = None,
               reserve: Callable[[int], None] | None = None, budget_frames: int | None = None) -> VideoClip:
    """`num_frames` RGB frames sampled uniformly over the video, decoding only what sampling needs.

    The sampled frame indices come from the container's metadata (frame count, or duration x rate; else the
    stream's packet count). A first pass reads the stream's packets without decoding them, for where its
    keyframes lie; then frames are decoded in order and dropped unless sampled, with a seek to the keyframe
    before a sampled frame only where that keyframe lies past where decoding has got to (one keyframe: one
    pass). Only sampled frames are converted to RGB, directly at `frame_size(width, height)` (the size the model
    will use: no larger than the source). Before decoding, the frames' RGB bytes are checked against
    `budget_bytes` (the request's remaining decoded-pixel budget), the frames the plan decodes against
    `budget_frames` (the request's remaining decoded-frame budget; `limits.max_decoded_frames` when None; also
    held while decoding, for streams whose packets mislead) — MediaError when over — and the bytes are passed
    to `reserve` (the server's memory budget; it may wait or raise). `should_stop` is polled while reading and
    decoding. The clip says how many frames were decoded (`decoded_frames`)."""
    import av

    mime = _check_video_request(data, mime_type, num_frames, limits)
    allowed = limits.max_decoded_frames if budget_frames is None else budget_frames
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(MediaError.CORRUPT, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            info = _video_info(container, stream, limits)
            width, height = frame_size(info.width, info.height) if frame_size else (info.width, info.height)
            need = _check_decoded_bytes(num_frames, width, height, limits, budget_bytes)
            # a container of its own, so that the one that decodes starts at the stream's start with no seek back
            with av.open(io.BytesIO(data), mode="r") as probe:
                index = _index_stream(probe.streams.video[0], info, limits, should_stop)
            total = info.frames or index.packets
            if not total:
                raise MediaError(MediaError.CORRUPT, "the video contains no decodable frames")
            indices = sample_frame_indices(total, num_frames)
            plan = _plan_decode(indices, index.keyframes)
            _check_decode_work(plan, num_frames, total, index, allowed, limits)
            _reserve(need, reserve)
            picked, seen, decoded = _decode_sampled(container, stream, info, plan, (width, height), allowed,
                                                    limits, should_stop)
            if picked is None:  # the container over-stated its length: sample again over what is really there
                if seen == 0:
                    raise MediaError(MediaError.CORRUPT, "the video contains no decodable frames")
                container.seek(0)
                # counted from the start, forward only: the timestamps that misled the length may mislead a seek
                plan = _plan_decode(sample_frame_indices(seen, num_frames), None)
                _check_decode_work(plan, num_frames, seen, index, allowed - decoded, limits)
                picked, _, more = _decode_sampled(container, stream, replace(info, rate=None), plan,
                                                  (width, height), allowed - decoded, limits, should_stop)
                decoded += more
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
    return VideoClip(picked, num_frames / seconds if seconds else None, decoded)


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


def _check_decoded_bytes(num_frames: int, width: int, height: int, limits: MediaLimits,
                         budget_bytes: int | None) -> int:
    """The sampled frames' RGB bytes, checked against the request's budget before any is decoded."""
    need = rgb_bytes(width, height, num_frames)
    if budget_bytes is not None and need > budget_bytes:
        raise MediaError(MediaError.TOO_LARGE,
                         f"{num_frames} frames of {width}x{height} take {need} bytes decoded; the request's "
                         f"decoded-media limit leaves {max(0, budget_bytes)} of {limits.max_decoded_bytes} "
                         "bytes: ask for fewer frames or send smaller media")
    return need


def _reserve(need: int, reserve: Callable[[int], None] | None) -> None:
    """The sampled frames' RGB bytes reserved with the server, once the video is known to be acceptable."""
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


@dataclass(frozen=True)
class _StreamIndex:
    """What the stream's packets say, read without decoding any."""

    packets: int
    keyframes: list[int] | None  # frame indices of its keyframes, ascending; None where seeking is blind


def _frame_at(pts: int, origin: int, tb, rate: float) -> int:
    """The frame index a presentation timestamp stands for."""
    return round(float((pts - origin) * tb) * rate)


def _index_stream(stream, info: VideoInfo, limits: MediaLimits, should_stop) -> _StreamIndex:
    """One pass over the stream's packets (demuxed, not decoded): how many there are, and where its keyframes lie.
    Without a rate and time base, or with a keyframe without a timestamp, no keyframe is placed: decoding then
    goes forward only, as a seek could land anywhere."""
    tb, rate = stream.time_base, info.rate
    origin = stream.start_time or 0
    placed = bool(tb and rate)
    packets = 0
    keyframes: set[int] = set()
    for packet in stream.container.demux(stream):
        if not packet.size:  # the flush packet that ends the stream
            continue
        packets += 1
        if packets > limits.max_source_frames:
            raise MediaError(MediaError.TOO_LARGE, f"video has more than {limits.max_source_frames} frames")
        if should_stop is not None and packets % STOP_CHECK_EVERY_PACKETS == 0 and should_stop():
            raise Cancelled()
        if placed and packet.is_keyframe:
            if packet.pts is None:
                placed = False
            else:
                keyframes.add(_frame_at(packet.pts, origin, tb, rate))
    return _StreamIndex(packets, sorted(keyframes) if placed else None)


@dataclass(frozen=True)
class _DecodePlan:
    """How sampling decodes a stream: the sampled indices (as asked, repeats included), those of them reached by
    a seek to the keyframe before them (the others by decoding on), and the frames decoding them all takes."""

    indices: list[int]
    seek_to: frozenset[int]
    frames: int


def _plan_decode(indices: list[int], keyframes: list[int] | None) -> _DecodePlan:
    """Decoding on from the last sampled frame, unless the keyframe before the next one lies more than
    SEEK_GAP_FRAMES past it: a seek there skips what lies between. With one keyframe, a single pass."""
    seek_to, frames, position = set(), 0, -1  # position: the last frame decoded (-1: none yet)
    for target in sorted(set(indices)):
        start = position + 1
        if keyframes:
            before = bisect.bisect_right(keyframes, target) - 1
            if before >= 0 and keyframes[before] - position > SEEK_GAP_FRAMES:
                seek_to.add(target)
                start = keyframes[before]
        frames += target - start + 1
        position = target
    return _DecodePlan(indices, frozenset(seek_to), frames)


def _decode_work_error(what: str, allowed: int, limits: MediaLimits) -> MediaError:
    return MediaError(MediaError.TOO_LARGE,
                      f"{what}; the request's decoded-frame limit leaves {max(0, allowed)} of "
                      f"{limits.max_decoded_frames}: ask for fewer frames, send a shorter clip, or re-encode it "
                      "with more keyframes (e.g. one every 2 seconds)")


def _check_decode_work(plan: _DecodePlan, wanted: int, total: int, index: _StreamIndex, allowed: int,
                       limits: MediaLimits) -> None:
    """The frames the plan decodes, checked against what the request has left, before any is decoded."""
    if plan.frames > allowed:
        keyframes = ("" if index.keyframes is None else
                     f", {len(index.keyframes)} keyframe{'s' if len(index.keyframes) != 1 else ''}")
        raise _decode_work_error(f"sampling {wanted} frames from this video ({total} frames{keyframes}) decodes "
                                 f"{plan.frames} frames", allowed, limits)


def _decode_sampled(container, stream, info: VideoInfo, plan: _DecodePlan, size: tuple[int, int], allowed: int,
                    limits: MediaLimits, should_stop) -> tuple[list[Image.Image] | None, int, int]:
    """(the frames at the plan's indices, converted at `size`; the frames in the stream, as far as decoding saw;
    the frames decoded), the first None if the stream ends first. Frame indices come from presentation
    timestamps when the stream has a rate (exact after a seek), else from counting decoded frames. More than
    `allowed` frames decoded (the plan misjudged the stream): MediaError."""
    tb, rate = stream.time_base, info.rate
    origin = stream.start_time or 0
    by_pts = bool(rate and tb)
    kept: dict[int, Image.Image] = {}
    frames = None
    position = -1  # index of the last frame decoded
    decoded = 0
    for target in sorted(set(plan.indices)):
        if kept and position >= target:  # the last kept frame already lies at or past this index
            kept[target] = kept[max(kept)]
            continue
        seek = target in plan.seek_to  # only where keyframes were placed: the stream has a rate and time base
        if frames is None or seek:
            if seek:
                container.seek(origin + int(target / rate / tb), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            decoded += 1
            if decoded > allowed:
                raise _decode_work_error(f"decoding this video went past {allowed} frames (its packets promised "
                                         f"{plan.frames})", allowed, limits)
            if should_stop is not None and decoded % STOP_CHECK_EVERY == 0 and should_stop():
                raise Cancelled()
            if by_pts and frame.pts is not None:
                position = _frame_at(frame.pts, origin, tb, rate)
            else:
                position += 1
            if position >= target:
                kept[target] = frame.reformat(width=size[0], height=size[1], format="rgb24",
                                              interpolation="AREA").to_image()
                break
        else:
            return None, max(decoded, position + 1), decoded
    return [kept[i] for i in plan.indices], max(position + 1, 0), decoded


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

