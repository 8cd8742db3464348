"""Decoding images (Pillow) and videos (PyAV) from bytes, with limits. Every failure is a MediaError
whose message says what was wrong and what the caller can do."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

from .errors import MediaError

IMAGE_MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
                    "image/gif": "GIF"}
VIDEO_MIME_TYPES = {"video/mp4", "video/webm", "video/x-matroska", "video/matroska", "video/quicktime",
                    "video/x-msvideo", "video/avi", "image/gif"}


@dataclass
class VideoClip:
    """Frames sampled from a video, and how many of them per second of the source (None if unknown)."""

    frames: list[Image.Image]
    fps: float | None


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 64 * 1024 * 1024  # per item
    max_pixels: int = 40_000_000  # per image / frame (width * height)
    max_frames: int = 64  # frames sampled from one video
    max_video_seconds: float = 3600.0


def decode_image(data: bytes, mime_type: str, limits: MediaLimits = MediaLimits()) -> Image.Image:
    """PNG, JPEG, WebP, GIF (first frame) -> RGB image."""
    mime = (mime_type or "").lower().strip()
    if mime not in IMAGE_MIME_TYPES:
        raise MediaError(MediaError.UNSUPPORTED,
                         f"unsupported image type {mime_type!r}; use one of {sorted(IMAGE_MIME_TYPES)}")
    _check_bytes(data, limits, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[IMAGE_MIME_TYPES[mime]])
            w, h = img.size
            if w * h > limits.max_pixels:
                raise MediaError(MediaError.TOO_LARGE,
                                 f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
            img.seek(0)
            img.load()
            return img.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(MediaError.TOO_LARGE, f"image is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime} image ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None


def decode_video(data: bytes, mime_type: str, num_frames: int, limits: MediaLimits = MediaLimits()
                 ) -> VideoClip:
    """Decodes a video and returns `num_frames` RGB frames sampled uniformly over its length."""
    import av

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
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(MediaError.CORRUPT, "the file has no video stream")
            stream = container.streams.video[0]
            seconds = None
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
                if seconds > limits.max_video_seconds:
                    raise MediaError(MediaError.TOO_LARGE,
                                     f"video is {seconds:.0f} s long; the limit is {limits.max_video_seconds:.0f} s")
            frames = []
            for frame in container.decode(stream):
                if frame.width * frame.height > limits.max_pixels:
                    raise MediaError(MediaError.TOO_LARGE,
                                     f"video frames are {frame.width}x{frame.height}; the limit is "
                                     f"{limits.max_pixels} pixels")
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > 100_000:
                    raise MediaError(MediaError.TOO_LARGE, "video has more than 100000 frames")
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg errors of many types
        raise MediaError(MediaError.CORRUPT,
                         f"cannot decode the {mime} video ({_describe(exc)}); "
                         "check that the bytes are a complete file of the declared type") from None
    if not frames:
        raise MediaError(MediaError.CORRUPT, "the video contains no decodable frames")
    if not seconds and stream.average_rate:
        seconds = len(frames) / float(stream.average_rate)
    picked = [Image.fromarray(frames[i]) for i in sample_frame_indices(len(frames), num_frames)]
    return VideoClip(picked, num_frames / seconds if seconds else None)


def sample_frame_indices(total: int, wanted: int) -> list[int]:
    """`wanted` indices spread uniformly over `total` frames (centres of equal segments); repeats frames
    when the video is shorter than `wanted`."""
    return [min(total - 1, int((i + 0.5) * total / wanted)) for i in range(wanted)]


def sniff_mime_type(data: bytes) -> str:
    """The MIME type of encoded media from its first bytes ("" if not recognised)."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"
    return ""


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

