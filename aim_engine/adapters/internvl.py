"""InternVL (InternVL3 / 3.5: InternViT + pixel shuffle + MLP projector + a Qwen2 or Qwen3 LM): images and video.

What differs for this family:
- Images are tiled: the processor cuts an image into up to `max_patches` square tiles by its aspect ratio, plus a
  thumbnail of the whole image when there is more than one. Every tile goes through the tower alone (CLS dropped),
  its patch grid is pixel-shuffled (2 x 2 patches -> one token, 4x the width) and projected: 256 tokens per 448-px
  tile. Merge groups: each tile, thumbnail included (as LLaVA-NeXT's crops). An image's tiles sit together behind
  one `<img> ... </img>`, which the processor writes around the chat template's `<IMG_CONTEXT>`.
- Video: every frame is one tile at the encoder's square input, written `FrameN: <img> ... </img>` on its own line
  in place of the template's `<video>`, so a video is one visual span per frame with text between them. Merge
  groups: each frame. Frames are resized and normalised here (transformers' video processor needs torchvision).
- 1-D RoPE: the merged sequence gets consecutive positions (or the plan's original ones), as for the LLaVA family.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import EncodedMedia, FamilyAdapter, encoder_flops, square_input_size


class InternVLAdapter(FamilyAdapter):
    family = "internvl"
    video_slice_frames = 1  # a frame is a tile, encoded alone
    supports_video = True
    images_independent = True

    @property
    def video_token_id(self) -> int | None:
        return None  # a video is written as frames of image context tokens

    def placeholder_id(self, kind: str) -> int:
        return self.image_token_id

    @property
    def reserved_text(self) -> tuple[str, ...]:
        return (self._token("context_image_token", "<IMG_CONTEXT>"), self._token("start_image_token", "<img>"),
                self._token("end_image_token", "</img>"), self._token("video_token", "<video>"))

    def _token(self, name: str, default: str) -> str:
        return getattr(self.tokenizer, name, None) or default

    @property
    def _side(self) -> int:
        size = self.config.vision_config.image_size
        return size[0] if isinstance(size, (list, tuple)) else size

    def _encoder_tokens(self) -> int:
        patch = self.config.vision_config.patch_size
        return (self._side // (patch[0] if isinstance(patch, (list, tuple)) else patch)) ** 2 + 1  # + CLS

    def _tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, side, side) -> (tiles, tokens per tile, d)."""
        with torch.inference_mode():
            return self.model.model.get_image_features(pixel_values.to(self.device, self.dtype),
                                                       return_dict=True).pooler_output

    def _item(self, kind: str, tiles: torch.Tensor) -> EncodedMedia:
        count, per_tile = tiles.shape[:2]
        groups = [torch.arange(i * per_tile, (i + 1) * per_tile, device=tiles.device) for i in range(count)]
        return EncodedMedia(kind=kind, features=tiles.flatten(0, 1), groups=groups,
                            vision_flops=encoder_flops(self.config.vision_config, self._encoder_tokens(), count))

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        inputs = self.image_processor(images=images, return_tensors="pt")
        tiles = self._tiles(inputs["pixel_values"])
        counts = inputs["num_patches"].tolist()
        return [self._item("image", part) for part in torch.split(tiles, counts)]

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        # the processor's own tile count for a size (its tiled canvas, plus the thumbnail): no pixel is touched
        count = self.image_processor.get_number_of_image_patches
        counts = [count(image.height, image.width) for image in images]
        return [([self.config.image_seq_length] * count, 0) for count in counts]

    def video_frame_size(self, width: int, height: int) -> tuple[int, int]:
        return square_input_size(width, height, self._side)

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        return self.encode_videos([(frames, fps)])[0]

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        """Every frame of every video in one pass (a frame is a tile, encoded alone)."""
        pixels = torch.cat([self.normalize_frames(frames, (self._side, self._side)) for frames, _ in videos])
        tiles = self._tiles(pixels)
        return [self._item("video", part) for part in torch.split(tiles, [len(f) for f, _ in videos])]

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        return [self.config.image_seq_length] * len(frames), 0

    def video_timestamps(self, frames: int, fps: float | None) -> list[float]:
        """One part per frame (its time is not written: frames are numbered)."""
        return [i / fps if fps else float(i) for i in range(frames)]

    def expand_media(self, prompt: str, timestamps: list[list[float]]) -> str:
        context = self._token("context_image_token", "<IMG_CONTEXT>")
        start, end = self._token("start_image_token", "<img>"), self._token("end_image_token", "</img>")
        video = self._token("video_token", "<video>")
        prompt = prompt.replace(context, f"{start}{context}{end}")
        for times in timestamps:
            frames = "\n".join(f"Frame{i + 1}: {start}{context}{end}" for i in range(len(times)))
            prompt = prompt.replace(video, frames, 1)
        return prompt
