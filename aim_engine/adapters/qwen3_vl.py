"""Qwen3-VL (dense and MoE text models): Qwen2-VL's pipeline (see qwen2_vl.py) with three differences.

- DeepStack. Vision blocks `deepstack_visual_indexes` each feed their own merger, giving `levels` more feature
  tensors with the rows of the projector output; level l is added to the visual tokens' hidden states after LLM
  layer l. `EncodedMedia.deepstack` carries them (levels, n, d). Merging applies the very merge it applied to the
  features to every level (`merging.merged_rows`: a survivor's rows are the mean of the input rows it stands
  for); pruning removes a token's later levels with it, as masking it would (decoder.prefill).
- Video timestamps are text. Each temporal patch (2 frames) is its own visual span: `<t seconds>` then
  <|vision_start|>, its tokens, <|vision_end|>, where t is the mean time of its frames. The chat template's
  `<|vision_start|><|video_pad|><|vision_end|>` is replaced by that run, as Qwen3-VL's own processor does (the
  processor of transformers 5.x keeps the outer pair; the released models were trained without it). A temporal
  patch is one merge group, so merging keeps at least one token per patch, and pruning, which only removes
  visual tokens, never touches the timestamps. Frames given without a rate are taken at 2 fps.
- M-RoPE is interleaved: frequency slots go round-robin to (t, h, w). Positions still come from the model's own
  `get_rope_index` on the unmerged prompt, which gives every temporal patch its own t after its timestamp; a
  merged survivor keeps the position of the token it stands for (for AIM's merge the B token the others were
  folded into), so nothing after it shifts, as for Qwen2-VL.

Attention has qk-norm before RoPE and an explicit head_dim; neither changes the engine's loop.
"""

from __future__ import annotations

import torch

from .qwen2_vl import Qwen2VLAdapter

DEFAULT_VIDEO_FPS = 2.0


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"

    @property
    def reserved_text(self) -> tuple[str, ...]:
        return super().reserved_text + tuple(self.tokenizer.convert_ids_to_tokens(
            [self.config.vision_start_token_id, self.config.vision_end_token_id]))

    def deepstack_of(self, output, item: int) -> torch.Tensor:
        return torch.stack([level[item] for level in output.deepstack_features])

    def video_timestamps(self, frames: int, fps: float | None) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame (the last frame repeated to
        fill the final patch, as the frames themselves are)."""
        tp = self.config.vision_config.temporal_patch_size
        rate = fps or DEFAULT_VIDEO_FPS
        index = list(range(frames)) + [frames - 1] * (-frames % tp)
        return [(index[i] / rate + index[i + tp - 1] / rate) / 2 for i in range(0, len(index), tp)]

    def expand_media(self, prompt: str, timestamps: list[list[float]]) -> str:
        tok = self.tokenizer
        start, end = tok.convert_ids_to_tokens([self.config.vision_start_token_id, self.config.vision_end_token_id])
        pad = tok.convert_ids_to_tokens(self.video_token_id)
        marker = "\0video\0"  # stands for the pads while the runs are placed, so none is replaced twice
        for seconds in timestamps:
            run = "".join(f"<{t:.1f} seconds>{start}{marker}{end}" for t in seconds)
            whole = f"{start}{pad}{end}"
            prompt = prompt.replace(whole if whole in prompt else pad, run, 1)
        return prompt.replace(marker, pad)
