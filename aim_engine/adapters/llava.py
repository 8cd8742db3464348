"""LLaVA-1.5-style models (`LlavaForConditionalGeneration`: any vision tower + projector + Llama-family LM).

What differs for this family: one fixed-size view per image (e.g. 24x24 = 576 CLIP tokens, or DINOv2's
16x16), no newline tokens; each image is one merge group. 1-D RoPE.

Video is an extension of ours, not of the LLaVA-1.5 paper: a checkpoint whose config names a `video_token_id`
(and optionally a `video_frame_size`, default the image size) takes a video as its frames, each encoded like an
image at that size, their tokens concatenated in time order behind one video placeholder; each frame is one
merge group. The reference model (reference_model) is such a checkpoint.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import EncodedMedia, FamilyAdapter, encoder_flops, square_input_size


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    images_independent = True
    video_slice_frames = 1  # each frame is an independent view

    @property
    def supports_video(self) -> bool:
        return getattr(self.config, "video_token_id", None) is not None

    def _tokens_per_view(self, side: int) -> int:
        """Encoder tokens per view of `side` pixels; "default" selection drops the class token."""
        p = self.config.vision_config.patch_size
        return (side // p) ** 2 + (0 if self.config.vision_feature_select_strategy == "default" else 1)

    def _features(self, pixel_values: torch.Tensor):
        with torch.inference_mode():
            return self.model.model.get_image_features(pixel_values.to(self.device, self.dtype), return_dict=True)

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = self._features(pixel_values)
        per_image = encoder_flops(self.config.vision_config, out.last_hidden_state.shape[1], 1)
        return [
            EncodedMedia(kind="image", features=feats, groups=[torch.arange(feats.shape[0], device=feats.device)],
                         vision_flops=per_image)
            for feats in out.pooler_output
        ]

    def _view_side(self) -> int:
        """The side of the square view the image processor makes of every image: its centre crop when it crops,
        else its resize target (a fixed size, or the shortest edge: the family's towers take square views)."""
        ip = self.image_processor
        if getattr(ip, "do_center_crop", False):
            return int(ip.crop_size["height"])
        return int(ip.size["height"]) if "height" in ip.size else int(ip.size["shortest_edge"])

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        return [([self._tokens_per_view(self._view_side())], 0) for _ in images]

    # ---- video (checkpoints with a video placeholder) -------------------------------------------------------
    def _frame_size(self) -> int:
        return int(getattr(self.config, "video_frame_size", None) or self._view_side())

    def video_frame_size(self, width: int, height: int) -> tuple[int, int]:
        return square_input_size(width, height, self._frame_size())

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        return self.encode_videos([(frames, fps)])[0]

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        """Every frame of every video in one batch: each frame is one independent view."""
        side = self._frame_size()
        out = self._features(torch.cat([self.normalize_frames(frames, (side, side)) for frames, _ in videos]))
        per_frame = out.pooler_output[0].shape[0]
        encoded, start = [], 0
        for frames, _ in videos:
            feats = torch.cat(list(out.pooler_output[start:start + len(frames)]))
            groups = [torch.arange(i * per_frame, (i + 1) * per_frame, device=feats.device)
                      for i in range(len(frames))]
            encoded.append(EncodedMedia(
                kind="video", features=feats, groups=groups,
                vision_flops=encoder_flops(self.config.vision_config, out.last_hidden_state.shape[1], len(frames))))
            start += len(frames)
        return encoded

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        return [self._tokens_per_view(self._frame_size())] * len(frames), 0
