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

from .base import EncodedMedia, FamilyAdapter, encoder_flops, square_input_size


class LlavaOnevisionAdapter(FamilyAdapter):
    family = "llava_onevision"
    supports_video = True

    def _newline_mask(self, features: torch.Tensor) -> torch.Tensor:
        newline = self.model.model.image_newline.to(features.dtype)
        return (features == newline).all(dim=-1)

    def _encoder_tokens(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def _image_features(self, pixel_values, image_sizes, count: int):
        return self.model.model.get_image_features(pixel_values, image_sizes,
                                                   batch_num_images=torch.tensor([count], device=self.device),
                                                   return_dict=True)

    def _views(self, image_sizes, count: int) -> list[int]:
        """Views the encoder runs per image: base + anyres crops; a base view only with several images."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        if count > 1:
            return [1] * count
        vc = self.config.vision_config
        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, vc.image_size)
                for size in image_sizes.tolist()]

    def _pack(self, features: list[torch.Tensor], image_sizes):
        return self.model.model.pack_image_features(features, image_sizes,
                                                    image_newline=self.model.model.image_newline.cpu())[0]

    def _groups(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """Merge groups of one packed image: the base view, and the high-resolution grid without newlines."""
        base_len = self._encoder_tokens()
        newline = self._newline_mask(feats)
        idx = torch.arange(feats.shape[0], device=feats.device)
        hires = idx[base_len:][~newline[base_len:]]
        return [idx[:base_len]] + ([hires] if hires.numel() else [])

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        inputs = self.image_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        image_sizes = inputs["image_sizes"].to(self.device)
        with torch.inference_mode():
            out = self._image_features(pixel_values, image_sizes, len(images))
        encoder_tokens = out.last_hidden_state.shape[1]
        return [EncodedMedia(kind="image", features=feats, groups=self._groups(feats),
                             vision_flops=encoder_flops(self.config.vision_config, encoder_tokens, views))
                for feats, views in zip(out.pooler_output, self._views(inputs["image_sizes"], len(images)))]

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        # The model's own packing (unpadding, downscaling, newlines) on zero features of the right shapes, so
        # the count cannot drift from the model's. Zeros never equal the learned newline. The processor's
        # image_sizes are the images' own (height, width), so no pixel is touched.
        sizes = torch.tensor([[image.height, image.width] for image in images])
        dim = self.model.model.image_newline.shape[0]
        zeros = [torch.zeros(views, self._encoder_tokens(), dim, dtype=self.dtype)
                 for views in self._views(sizes, len(images))]
        out = []
        for feats in self._pack(zeros, sizes):
            groups = self._groups(feats)
            out.append(([g.numel() for g in groups], feats.shape[0] - sum(g.numel() for g in groups)))
        return out

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        side = math.ceil(self.config.vision_config.image_size // self.config.vision_config.patch_size / 2)
        return [side * side] * len(frames), 1

    def video_frame_size(self, width: int, height: int) -> tuple[int, int]:
        return square_input_size(width, height, self.config.vision_config.image_size)

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        return self.encode_videos([(frames, fps)])[0]

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        """Every frame of every video in one pass: frames are encoded and pooled one by one, and the newline after
        a video's last frame is the learned `image_newline`, so one pass over all frames splits exactly."""
        size = self.config.vision_config.image_size
        pixel_values = torch.cat([self.normalize_frames(frames, (size, size)) for frames, _ in videos])
        with torch.inference_mode():
            out = self.model.model.get_video_features(pixel_values[None].to(self.device, self.dtype), return_dict=True)
        feats = out.pooler_output[0]  # (all frames * per_frame + 1, d)
        newline = feats[-1:]
        per_frame = (feats.shape[0] - 1) // pixel_values.shape[0]
        encoded, start = [], 0
        for frames, _ in videos:
            end = start + len(frames) * per_frame
            video = torch.cat([feats[start:end], newline])
            groups = [torch.arange(i * per_frame, (i + 1) * per_frame, device=feats.device)
                      for i in range(len(frames))]
            encoded.append(EncodedMedia(
                kind="video", features=video, groups=groups,
                vision_flops=encoder_flops(self.config.vision_config, out.last_hidden_state.shape[1], len(frames))))
            start = end
        return encoded
