"""LLaVA-OneVision (SigLIP + Qwen2): images (anyres crops) and video.

What differs for this family:
- images: the model's own `get_image_features` packs a base view plus unpadded high-resolution crops with a
  learned newline embedding after each row. Merge groups: the base view, and the high-resolution grid; the
  newline embeddings pass through. With several images in one prompt, each image is a base view only (the
  model's multi-image rule), plus one newline.
- video: every frame is resized to the encoder's square input; features are 2x2-pooled per frame
  (27x27 -> 14x14 = 196 tokens for SigLIP-384), one newline after the last frame. Merge groups: each frame.
- 1-D RoPE: the merged sequence gets consecutive positions.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from .base import EncodedMedia, FamilyAdapter, encoder_flops


class LlavaOnevisionAdapter(FamilyAdapter):
    family = "llava_onevision"
    supports_video = True

    def _newline_mask(self, features: torch.Tensor) -> torch.Tensor:
        newline = self.model.model.image_newline.to(features.dtype)
        return (features == newline).all(dim=-1)

    def _encoder_tokens(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        inputs = self.image_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        image_sizes = inputs["image_sizes"].to(self.device)
        batch_num_images = torch.tensor([len(images)], device=self.device)
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values, image_sizes, batch_num_images=batch_num_images, return_dict=True
            )
        # views the encoder ran per image (base + anyres crops; a base view only with several images)
        encoder_tokens = out.last_hidden_state.shape[1]
        views = [1] * len(images) if len(images) > 1 else [int(out.last_hidden_state.shape[0])]
        base_len = self._encoder_tokens()
        encoded = []
        for feats, n_views in zip(out.pooler_output, views):
            newline = self._newline_mask(feats)
            idx = torch.arange(feats.shape[0], device=feats.device)
            groups = [idx[:base_len]]
            hires = idx[base_len:][~newline[base_len:]]
            if hires.numel():
                groups.append(hires)
            encoded.append(EncodedMedia(
                kind="image", features=feats, groups=groups,
                vision_flops=encoder_flops(self.config.vision_config, encoder_tokens, n_views),
            ))
        return encoded

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        # The model's own packing (unpadding, anyres_max downscaling, newlines) on zero features of the right
        # shapes, so the count cannot drift from the model's. Zeros never equal the learned newline.
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        inputs = self.image_processor(images=images, return_tensors="pt")
        base_len = self._encoder_tokens()
        dim = self.model.model.image_newline.shape[0]
        vc = self.config.vision_config
        zeros = [torch.zeros(1 if len(images) > 1 else image_size_to_num_patches(
                     size, self.config.image_grid_pinpoints, vc.image_size), base_len, dim, dtype=self.dtype)
                 for size in inputs["image_sizes"].tolist()]
        packed, _ = self.model.model.pack_image_features(zeros, inputs["image_sizes"],
                                                         image_newline=self.model.model.image_newline.cpu())
        out = []
        for feats in packed:
            newlines = int(self._newline_mask(feats).sum())
            hires = feats.shape[0] - base_len - newlines
            out.append(([base_len] + ([hires] if hires else []), newlines))
        return out

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        side = math.ceil(self.config.vision_config.image_size // self.config.vision_config.patch_size / 2)
        return [side * side] * len(frames), 1

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        size = self.config.vision_config.image_size
        pixel_values = self.normalize_frames(frames, (size, size))[None].to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.model.get_video_features(pixel_values, return_dict=True)
        feats = out.pooler_output[0]  # (T * per_frame + 1, d)
        per_frame = (feats.shape[0] - 1) // len(frames)
        groups = [torch.arange(i * per_frame, (i + 1) * per_frame, device=feats.device) for i in range(len(frames))]
        return EncodedMedia(
            kind="video", features=feats, groups=groups,
            vision_flops=encoder_flops(self.config.vision_config, out.last_hidden_state.shape[1], len(frames)),
        )
