"""Sample media of the reference model's world for demos: a scene (PNG) and a clip (MP4) from the synthetic test
split, with their questions and right answers in questions.json (`aim-serve sample-media`)."""

from __future__ import annotations

import json
from pathlib import Path

from . import synthetic as syn


def encode_mp4(frames) -> bytes:
    """PIL frames as an MPEG-4 clip, one second long."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=len(frames))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.bit_rate = 2_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_samples(out: Path, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    index = 10_000  # the first test-split scene past 10000 with 3-4 objects: something to count
    while syn.make_image(seed, "test", index).qas[0].answer not in ("3", "4"):
        index += 1
    scene = syn.make_image(seed, "test", index)
    scene.frames[0].save(out / "scene.png")
    clip = syn.make_video(seed, "test", 10_000)
    (out / "clip.mp4").write_bytes(encode_mp4(clip.frames))
    qas = {"scene.png": [vars(q) for q in scene.qas], "clip.mp4": [vars(q) for q in clip.qas]}
    (out / "questions.json").write_text(json.dumps(qas, indent=2) + "\n")
    return [out / name for name in ("scene.png", "clip.mp4", "questions.json")]
