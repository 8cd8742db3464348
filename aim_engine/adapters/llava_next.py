"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`: CLIP + Llama/Mistral/Vicuna): images.

Images are packed like LLaVA-OneVision's single image (see llava_onevision.py): a base view, then the
unpadded high-resolution grid of anyres crops with a learned newline after each row; merge groups are the
base view and the grid, newlines pass through. What differs: every image gets its crops, also with several
images in one prompt; there is no `anyres_max` downscaling; no video. 1-D RoPE.
"""

from __future__ import annotations

import torch

from .llava_onevision import LlavaOnevisionAdapter


class LlavaNextAdapter(LlavaOnevisionAdapter):
    family = "llava_next"
    supports_video = False
    images_independent = True  # every image gets its crops however many share the prompt

    def _image_features(self, pixel_values, image_sizes, count: int):
        return self.model.model.get_image_features(pixel_values, image_sizes, return_dict=True)

    def _views(self, image_sizes, count: int) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = self.config.vision_config
        return [image_size_to_num_patches(size, self.config.image_grid_pinpoints, vc.image_size)
                for size in image_sizes.tolist()]

    def _pack(self, features: list[torch.Tensor], image_sizes):
        return self.model.model.pack_image_features(features, image_sizes, self.config.vision_feature_select_strategy,
                                                    image_newline=self.model.model.image_newline.cpu())[0]

    def estimate_video_groups(self, frames):
        raise NotImplementedError("llava_next does not take video")
