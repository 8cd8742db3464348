"""Real encoded media for tests, made with Pillow and PyAV (nothing downloaded)."""

from __future__ import annotations

import io
from functools import lru_cache

import av
import numpy as np
from PIL import Image


def encode_image(fmt: str, size=(48, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def encode_video(container: str = "mp4", codec: str = "mpeg4", frames: int = 12, size=(64, 64), fps=12) -> bytes:
    """A moving square on a gradient, so frames differ and sampling order is checkable."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            arr = np.zeros((*size, 3), dtype=np.uint8)
            arr[..., 0] = np.linspace(0, 255, size[1], dtype=np.uint8)[None, :]
            x = (t * 4) % (size[1] - 8)
            arr[8:16, x : x + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_counter_video(container: str = "mp4", codec: str = "mpeg4", frames: int = 300, gop: int = 10,
                         fps: int = 25) -> bytes:
    """Frames that say their own index, up to 1600 of them: the left half's grey level is index // 50, the right
    half's index % 50 (read back by `frame_index`). A keyframe every `gop` frames and no others (the encoders'
    scene-change keyframes are off: the grey steps would place some): by default a short interval, so the decoder
    seeks; libx264 with `gop` over `frames` gives one keyframe (mpeg4 puts one at least every 600 frames)."""
    assert frames <= 1600, "frame_index reads up to 1599"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.gop_size = gop
        stream.options = ({"qmin": "1", "qmax": "4", "sc_threshold": "1000000000"} if codec == "mpeg4" else
                          {"sc_threshold": "0"} if codec == "libx264" else {})
        for t in range(frames):
            arr = np.zeros((32, 64, 3), dtype=np.uint8)
            arr[:, :32] = (t // 50) * 8
            arr[:, 32:] = (t % 50) * 5
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def frame_index(frame: Image.Image) -> int:
    arr = np.asarray(frame.convert("L"), dtype=np.float64)
    h, w = arr.shape
    return int(round(arr[:, : w // 2 - 2].mean() / 8)) * 50 + int(round(arr[:, w // 2 + 2:].mean() / 5))


# ---- hostile and unusual media, for the fault suite -------------------------------------------------------------
def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 8000, height: int = 6000) -> bytes:
    """A few KB of PNG that decodes to width x height pixels."""
    return _save(Image.new("1", (width, height)), "PNG", optimize=True)


def animated_gif(frames: int = 3000, size=(16, 16)) -> bytes:
    images = [Image.new("P", size, i % 200) for i in range(frames)]
    for img in images:
        img.putpalette(list(range(256)) * 3)
    return _save(images[0], "GIF", save_all=True, append_images=images[1:], duration=20)


def animated_webp(frames: int = 500, size=(16, 16)) -> bytes:
    images = [Image.new("RGB", size, (i % 250, 0, 0)) for i in range(frames)]
    return _save(images[0], "WEBP", save_all=True, append_images=images[1:], duration=20, lossless=True)


def unusual_images() -> dict[str, tuple[bytes, str]]:
    """Image modes and metadata a decoder must handle: name -> (bytes, MIME type)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    return {
        "cmyk jpeg": (_save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), "image/jpeg"),
        "16-bit png": (_save(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"), "image/png"),
        "rgba png": (_save(Image.new("RGBA", (40, 30), (0, 0, 255, 128)), "PNG"), "image/png"),
        "palette png with transparency": (_save(palette, "PNG"), "image/png"),
        "greyscale webp": (_save(Image.new("L", (40, 30), 90), "WEBP"), "image/webp"),
        "exif-rotated jpeg": (_save(Image.new("RGB", (40, 30), (0, 200, 0)), "JPEG", exif=exif), "image/jpeg"),
        "animated gif (3000 frames)": (animated_gif(), "image/gif"),
        "animated webp (500 frames)": (animated_webp(), "image/webp"),
    }


def video_formats() -> dict[str, tuple[bytes, str]]:
    """One short clip in every container the server accepts."""
    return {
        "mp4": (encode_video("mp4", "mpeg4"), "video/mp4"),
        "mp4 h264": (encode_video("mp4", "libx264"), "video/mp4"),
        "webm": (encode_video("webm", "libvpx"), "video/webm"),
        "mkv": (encode_video("matroska", "mpeg4"), "video/x-matroska"),
        "mov": (encode_video("mov", "mpeg4"), "video/quicktime"),
        "avi": (encode_video("avi", "mpeg4"), "video/x-msvideo"),
        "gif": (animated_gif(24, (32, 32)), "image/gif"),
    }


def big_clip(frames: int = 900, width: int = 1920, height: int = 1080) -> bytes:
    """The issue's clip: a red box moving on grey, 1080p, 30 fps, H.264 (fast preset) — ~100 KB that decodes to
    several GB if every frame is converted."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast", "tune": "zerolatency"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y = np.full((height, width), 126, dtype=np.uint8)
        u = np.full((height // 2, width // 2), 128, dtype=np.uint8)
        v = np.full((height // 2, width // 2), 128, dtype=np.uint8)
        for t in range(frames):
            x = (t * 2) % (width - 100)
            yy, vv = y.copy(), v.copy()
            yy[400:500, x:x + 100] = 82
            vv[200:250, x // 2:x // 2 + 50] = 240
            frame = av.VideoFrame.from_ndarray(np.concatenate([yy, u.reshape(-1, width), vv.reshape(-1, width)]),
                                               format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@lru_cache(maxsize=4)
def long_gop_clip(frames: int, size=(16, 16), fps: int = 25) -> bytes:
    """One keyframe, then `frames` - 1 frames that depend on it (a line moving across grey; H.264 with no scene-cut
    keyframes): sampling must decode through to the last sampled frame. Tiny frames, so that tens of thousands
    of them stay a few hundred KB and build in about a second."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "sc_threshold": "0"})
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.gop_size = frames + 1
        grey = np.full((*size, 3), 90, dtype=np.uint8)
        for t in range(frames):
            arr = grey.copy()
            arr[:, t % size[1]] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
