"""Qwen2-VL (ViT with 2x2 patch merger + Qwen2 LM with M-RoPE): images and video.

What differs for this family:
- The projector output is the vision tower's merger output: one token per 2x2 patches. A video is cut into
  temporal patches of 2 frames; each temporal slice (t) of h*w tokens is one merge group, as is each image.
- M-RoPE: every token has a (t, h, w) position. Positions are computed by the model's own `get_rope_index`
  on the *unmerged* prompt; a merged survivor keeps the position of the token it stands for (the B token it
  absorbed others into, or itself), and text keeps its positions, so nothing after a merged image shifts.
  Generated tokens continue from max(position) + 1, as in the model's own decoding.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .base import EncodedMedia, FamilyAdapter, encoder_flops


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    supports_video = True
    uses_mrope = True
    images_independent = True

    @property
    def video_slice_frames(self) -> int:
        """A temporal patch: the tower attends within each one's tokens only."""
        return self.config.vision_config.temporal_patch_size

    @property
    def _merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def _tokens(self, patches: int) -> int:
        """Tokens the merger makes of `patches` patches (one per merge x merge)."""
        return patches // self._merge**2

    def _vit_flops(self, grid_thw: torch.Tensor) -> float:
        t, h, w = (int(x) for x in grid_thw)
        return encoder_flops(self.config.vision_config, h * w, t)

    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        inputs = self.image_processor(images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"].to(self.device)
        with torch.inference_mode():
            out = self.model.model.get_image_features(inputs["pixel_values"].to(self.device, self.dtype), grid,
                                                      return_dict=True)
        return [
            EncodedMedia(kind="image", features=feats, groups=[torch.arange(feats.shape[0], device=feats.device)],
                         vision_flops=self._vit_flops(g), grid_thw=g, deepstack=self.deepstack_of(out, i))
            for i, (feats, g) in enumerate(zip(out.pooler_output, grid))
        ]

    def deepstack_of(self, output, item: int) -> torch.Tensor | None:
        """The item's DeepStack features from the tower's output (Qwen3-VL), or None."""
        return None

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        # the processor's own patch count for a size (its smart_resize), which encoding uses: no pixel is touched
        count = self.image_processor.get_number_of_image_patches
        return [([self._tokens(count(image.height, image.width))], 0) for image in images]

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        t, h, w = self.video_grid(frames)
        return [self._tokens(h * w)] * t, 0

    def video_frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The size `video_pixels` resizes to (its smart_resize), unless that is larger than the source."""
        h, w = self._resized(height, width)
        return (w, h) if w * h <= width * height else (width, height)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip, vc = self.image_processor, self.config.vision_config
        return smart_resize(height, width, factor=vc.patch_size * self._merge, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])

    def video_grid(self, frames: list[Image.Image]) -> tuple[int, int, int]:
        """Patches (t, h, w) of a clip, from its frame count and first frame's size alone: every frame resized
        to that frame's smart_resize (a multiple of patch * merge), the count rounded up to whole temporal
        patches."""
        vc = self.config.vision_config
        w0, h0 = frames[0].size
        h, w = self._resized(h0, w0)
        return -(-len(frames) // vc.temporal_patch_size), h // vc.patch_size, w // vc.patch_size

    def video_pixels(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames -> (patches, C * tp * p * p) and grid (t, h, w), the layout of the model's video input:
        frames resized to `video_grid`'s size, normalised, padded to a multiple of the temporal patch by
        repeating the last frame; each patch flattened as (C, tp, p, p)."""
        vc = self.config.vision_config
        p, tp, m = vc.patch_size, vc.temporal_patch_size, self._merge
        gt, gh, gw = self.video_grid(frames)
        x = self.normalize_frames(frames, (gh * p, gw * p)).numpy()  # (T, C, H, W)
        if x.shape[0] % tp:
            x = np.concatenate([x, np.repeat(x[-1:], tp - x.shape[0] % tp, axis=0)])
        c = x.shape[1]
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
        patches = torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p))
        return patches, torch.tensor([gt, gh, gw])

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        return self.encode_videos([(frames, fps)])[0]

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        """Several videos in one pass: the tower attends within each video's patches only (its own grid), so
        their patches concatenate whatever their sizes and the output splits back per grid exactly."""
        pixels = [self.video_pixels(frames) for frames, _ in videos]
        grids = torch.stack([grid for _, grid in pixels]).to(self.device)
        patches = torch.cat([patches for patches, _ in pixels])
        with torch.inference_mode():
            out = self.model.model.get_video_features(patches.to(self.device, self.dtype), grids, return_dict=True)
        encoded = []
        for i, (feats, grid) in enumerate(zip(out.pooler_output, grids)):
            per_t = self._tokens(int(grid[1] * grid[2]))
            groups = [torch.arange(i * per_t, (i + 1) * per_t, device=feats.device) for i in range(int(grid[0]))]
            encoded.append(EncodedMedia(kind="video", features=feats, groups=groups,
                                        vision_flops=self._vit_flops(grid), grid_thw=grid,
                                        deepstack=self.deepstack_of(out, i)))
        return encoded

    def mrope_positions(self, full_ids: torch.Tensor, media: list[EncodedMedia]) -> torch.Tensor:
        types = torch.zeros_like(full_ids, dtype=torch.int32)
        types[full_ids == self.image_token_id] = 1
        types[full_ids == self.video_token_id] = 2
        images = [m.grid_thw for m in media if m.kind == "image"]
        videos = [m.grid_thw for m in media if m.kind == "video"]
        positions, _ = self.model.model.get_rope_index(
            full_ids, types,
            image_grid_thw=torch.stack(images) if images else None,
            video_grid_thw=torch.stack(videos) if videos else None,
            **self.rope_index_kwargs(media),
        )
        return positions

    def rope_index_kwargs(self, media: list[EncodedMedia]) -> dict:
        """Family-specific extra arguments of the model's `get_rope_index`."""
        return {}
