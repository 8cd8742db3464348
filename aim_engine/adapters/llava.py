"""LLaVA-1.5-style models (`LlavaForConditionalGeneration`: any vision tower + projector + Llama-family LM):
images only.

What differs for this family: one fixed-size view per image (e.g. 24x24 = 576 CLIP tokens, or DINOv2's
16x16), no newline tokens; each image is one merge group. 1-D RoPE.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import EncodedMedia, FamilyAdapter, encoder_flops


class LlavaAdapter(FamilyAdapter):
    family = "llava"

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model.model.get_image_features(pixel_values.to(self.device, self.dtype), return_dict=True)
        per_image = encoder_flops(self.config.vision_config, out.last_hidden_state.shape[1], 1)
        return [
            EncodedMedia(kind="image", features=feats, groups=[torch.arange(feats.shape[0], device=feats.device)],
                         vision_flops=per_image)
            for feats in out.pooler_output
        ]

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        # one view per image; "default" selection drops the class token, "full" keeps it
        h, w = self.image_processor(images=images[:1], return_tensors="pt")["pixel_values"].shape[-2:]
        p = self.config.vision_config.patch_size
        n = (h // p) * (w // p) + (0 if self.config.vision_feature_select_strategy == "default" else 1)
        return [([n], 0) for _ in images]
