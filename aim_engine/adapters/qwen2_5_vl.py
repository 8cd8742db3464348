"""Qwen2.5-VL: Qwen2-VL's pipeline (see qwen2_vl.py) with two differences that matter here:

- the vision tower uses windowed attention and an MLP merger (invisible to the engine: features come from the
  model's own `get_image_features` / `get_video_features`);
- M-RoPE's time axis is in seconds: a video's temporal position advances by `tokens_per_second` x seconds per
  temporal patch. Seconds per temporal patch = temporal_patch_size / fps of the sampled frames, passed to the
  model's own `get_rope_index` as `second_per_grid_ts`. Frames given without a rate are taken at 2 fps.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import EncodedMedia
from .qwen2_vl import Qwen2VLAdapter

DEFAULT_VIDEO_FPS = 2.0


class Qwen2_5VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        encoded = super().encode_videos(videos)
        for media, (_, fps) in zip(encoded, videos):
            media.extra["seconds_per_grid"] = self.config.vision_config.temporal_patch_size / (fps or DEFAULT_VIDEO_FPS)
        return encoded

    def rope_index_kwargs(self, media: list[EncodedMedia]) -> dict:
        seconds = [m.extra["seconds_per_grid"] for m in media if m.kind == "video"]
        return {"second_per_grid_ts": torch.tensor(seconds)} if seconds else {}
