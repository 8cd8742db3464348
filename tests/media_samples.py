"""Real encoded media for tests, made with Pillow and PyAV (nothing downloaded)."""

from __future__ import annotations

import io

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
    """Frames that say their own index: the left half's grey level is index // 50, the right half's index % 50
    (read back by `frame_index`). A short keyframe interval, so the decoder seeks."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.gop_size = gop
        stream.options = {"qmin": "1", "qmax": "4"} if codec == "mpeg4" else {}
        for t in range(frames):
            arr = np.zeros((32, 64, 3), dtype=np.uint8)
            arr[:, :32] = (t // 50) * 40
            arr[:, 32:] = (t % 50) * 5
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def frame_index(frame: Image.Image) -> int:
    arr = np.asarray(frame.convert("L"), dtype=np.float64)
    h, w = arr.shape
    return int(round(arr[:, : w // 2 - 2].mean() / 40)) * 50 + int(round(arr[:, w // 2 + 2:].mean() / 5))
