"""Gemma 3 (SigLIP + Gemma 3 LM): images.

What differs for this family:
- An image is 896 x 896 (never pan-and-scan crops, whatever the processor says), 64 x 64 patches pooled to
  16 x 16 = 256 tokens, written `\\n\\n<start_of_image>` + its tokens + `<end_of_image>\\n\\n` in place of the chat
  template's `<start_of_image>`. One merge group per image.
- Attention kinds. Five of every six layers attend over a sliding window (1024 positions for Gemma-3-4B) with
  their own rotary base; the rest attend to everything. `LanguageModel.layer_types` carries that per layer.
  A window is measured in positions (the ones the plan gives: with `positions="original"` a merged image keeps
  the span it had; consecutive positions close it up, as a shorter prompt would). Pruning never moves a position,
  so a kept token's window holds what it held unpruned, less what was pruned: exactly masking the pruned keys.
- An image's tokens attend to each other both ways (within the window at sliding layers); text stays causal. The
  block is what survives of the image: merged tokens, then the tokens pruning keeps. Importance scores for pruning
  are computed from the decision layer's queries and keys as for every family; the PageRank scorer's graph is the
  causal one (an image token's attention to later tokens of its image is not in it).
- 1-D RoPE; token embeddings are scaled by sqrt(d) inside the model's own embedding, image features are not.
The decode KV cache keeps every key (with its position, which the windows are measured in): a sliding layer's
keys older than the window are masked, not evicted.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..decoder import LanguageModel
from ..errors import ModelLoadError
from .base import EncodedMedia, FamilyAdapter, encoder_flops


class Gemma3Adapter(FamilyAdapter):
    family = "gemma3"
    images_independent = True
    bidirectional_media = True

    def __init__(self, model, tokenizer, image_processor):
        super().__init__(model, tokenizer, image_processor)
        tc = self.text_config
        if tc.final_logit_softcapping or tc.attn_logit_softcapping:
            raise ModelLoadError("Gemma checkpoints with logit soft-capping are not supported (Gemma 3 has none)")

    def language_model(self) -> LanguageModel:
        tm, tc = self.text_model, self.text_config
        return LanguageModel(tm.embed_tokens, tm.layers, tm.norm, tm.rotary_emb, self.model.lm_head,
                             layer_types=tuple(tc.layer_types), sliding_window=tc.sliding_window)

    @property
    def video_token_id(self) -> int | None:
        return None

    @property
    def reserved_text(self) -> tuple[str, ...]:
        return tuple(self.tokenizer.convert_ids_to_tokens(
            [self.image_token_id, self.config.boi_token_index, self.config.eoi_token_index]))

    def _tokens(self) -> int:
        return self.config.mm_tokens_per_image

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        pixels = self.image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            feats = self.model.model.get_image_features(pixels.to(self.device, self.dtype), return_dict=True)
        vc = self.config.vision_config
        flops = encoder_flops(vc, (vc.image_size // vc.patch_size) ** 2, 1)
        return [EncodedMedia(kind="image", features=f, groups=[torch.arange(f.shape[0], device=f.device)],
                             vision_flops=flops) for f in feats.pooler_output]

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        return [([self._tokens()], 0) for _ in images]

    def expand_media(self, prompt: str, timestamps: list[list[float] | None]) -> str:
        start, end, image = self.tokenizer.convert_ids_to_tokens(
            [self.config.boi_token_index, self.config.eoi_token_index, self.image_token_id])
        return prompt.replace(start, f"\n\n{start}{image}{end}\n\n")
