"""What every model family provides to the engine. One file per family says what differs for it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..decoder import LanguageModel
from ..errors import Cancelled


@dataclass
class EncodedMedia:
    """One image or video after the vision encoder and projector (and any model-specific pooling)."""

    kind: str  # "image" | "video"
    features: torch.Tensor  # (n, d) in the order of the LLM's placeholder tokens
    groups: list[torch.Tensor]  # frames / crops: index tensors into `features`, merged separately
    vision_flops: float  # encoder FLOPs spent on this item (not reduced by AIM)
    grid_thw: torch.Tensor | None = None  # M-RoPE models: (t, h, w) of the patch grid
    deepstack: torch.Tensor | None = None  # (levels, n, d): Qwen3-VL's DeepStack features, rows as `features`
    extra: dict = field(default_factory=dict)
    vision_s: float = 0.0  # seconds the vision tower spent on this item (its share of a batched pass)
    decoded_bytes: int = 0  # RGB bytes of the images / frames it was encoded from
    cache: str = ""  # the feature cache: "hit" (reused), "miss" (computed and kept), "" (not cacheable / off)

    @property
    def shape(self) -> tuple[list[int], int]:
        """(merge-group sizes, tokens in no group): what the cost of a request holding this item depends on."""
        sizes = [int(g.numel()) for g in self.groups]
        return sizes, int(self.features.shape[0]) - sum(sizes)


class FamilyAdapter:
    """Base class: the parts of a Hugging Face VLM the engine drives."""

    family: str = ""
    supports_video: bool = False
    uses_mrope: bool = False
    # An image's features do not depend on the other images of its prompt, so images of several prompts may go
    # through the vision tower together (False where the family packs an image by how many share its prompt).
    images_independent: bool = False
    # The tokens behind one placeholder attend to each other both ways (Gemma 3's images), not only causally.
    bidirectional_media: bool = False

    def __init__(self, model, tokenizer, image_processor):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model.config

    # ---- the language model -------------------------------------------------------------------
    @property
    def text_model(self):
        return self.model.model.language_model

    def language_model(self) -> LanguageModel:
        tm = self.text_model
        return LanguageModel(tm.embed_tokens, tm.layers, tm.norm, tm.rotary_emb, self.model.lm_head)

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.config, "video_token_id", None)

    def placeholder_id(self, kind: str) -> int:
        return self.image_token_id if kind == "image" else self.video_token_id

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The ids of the tokens that stand for a media item in a rendered prompt (image, and video if any)."""
        return tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)

    @property
    def reserved_text(self) -> tuple[str, ...]:
        """Token strings a request's text may not contain: they would be read as the prompt's media structure (the
        placeholders, and the family's own media delimiters)."""
        return tuple(self.tokenizer.convert_ids_to_tokens(list(self.placeholder_ids)))

    def placeholder_spans(self, media: EncodedMedia) -> list[int]:
        """How the item's feature rows, in order, sit behind placeholder tokens of the prompt: one count per
        placeholder. All behind one, except a video of a family that writes it out in parts (`video_timestamps`,
        kept in `extra["timestamps"]` when it was encoded): one per part, a merge group each, with `expand_media`
        writing as many placeholders."""
        if media.kind == "video" and media.extra.get("timestamps") is not None:
            return [int(g.numel()) for g in media.groups]
        return [int(media.features.shape[0])]

    def video_timestamps(self, frames: int, fps: float | None) -> list[float] | None:
        """Families that write a video out as several parts with text between them (Qwen3-VL's timestamped temporal
        patches, InternVL's numbered frames): the time of each part, in seconds. None: one placeholder."""
        return None

    def expand_media(self, prompt: str, timestamps: list[list[float] | None]) -> str:
        """The rendered prompt with its media placeholders written out as the family's processor does (each
        video's parts from its `video_timestamps`, in order). By default, unchanged."""
        return prompt

    # ---- media --------------------------------------------------------------------------------
    def encode_images(self, images: list[Image.Image]) -> list[EncodedMedia]:
        raise NotImplementedError

    def encode_image_sets(self, sets: list[list[Image.Image]]) -> list[list[EncodedMedia]]:
        """The images of several prompts (one list per prompt): in one pass through the tower where the family's
        images are independent, else prompt by prompt."""
        if not self.images_independent:
            return [self.encode_images(images) if images else [] for images in sets]
        flat = [image for images in sets for image in images]
        encoded = iter(self.encode_images(flat) if flat else [])
        return [[next(encoded) for _ in images] for images in sets]

    def encode_video(self, frames: list[Image.Image], fps: float | None = None) -> EncodedMedia:
        raise NotImplementedError(f"{self.family} does not take video")

    def encode_videos(self, videos: list[tuple[list[Image.Image], float | None]]) -> list[EncodedMedia]:
        """Several videos (of one request or of several) through the vision tower. Families whose frames are
        encoded independently of each other override this to run all frames in one batch; by default, one
        video at a time."""
        return [self.encode_video(frames, fps) for frames, fps in videos]

    # Frames per slice of a video that the tower encodes exactly alone (its frames attend to nothing outside
    # the slice), so a long video can be encoded over several engine steps (vision.join_slices); None: a video
    # goes through the tower whole.
    video_slice_frames: int | None = None

    def join_video(self, slices: list[EncodedMedia]) -> EncodedMedia:
        """One video from its slices' encodings, in order, as encoding it whole gives: features (and DeepStack
        rows) concatenated, each slice's groups moved past the ones before, the grid's time summed."""
        offsets, groups = 0, []
        for part in slices:
            groups += [g + offsets for g in part.groups]
            offsets += part.features.shape[0]
        first = slices[0]
        grid = None
        if first.grid_thw is not None:
            grid = first.grid_thw.clone()
            grid[0] = sum(int(p.grid_thw[0]) for p in slices)
        deepstack = None if first.deepstack is None else torch.cat([p.deepstack for p in slices], dim=1)
        return EncodedMedia(kind="video", features=torch.cat([p.features for p in slices]), groups=groups,
                            vision_flops=sum(p.vision_flops for p in slices), grid_thw=grid, deepstack=deepstack,
                            extra=dict(first.extra), vision_s=sum(p.vision_s for p in slices))

    def video_frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The size to decode a `width` x `height` video's frames at: no smaller in either dimension than the
        model's processor will resize them to, never larger than the source (so decoding holds no more pixels
        than the model uses, and the processor's own resize still decides the final input). By default, the
        source size; families override."""
        return width, height

    @contextmanager
    def stoppable_vision(self, should_stop: Callable[[], bool] | None):
        """While active, the vision tower polls `should_stop` before each of its blocks and raises Cancelled
        when it says so: a cancelled request stops inside the tower, not only after it."""
        if should_stop is None:
            yield
            return

        def check(module, args):
            if should_stop():
                raise Cancelled()

        tower = self.vision_tower()
        blocks = [block for lst in tower.modules() if isinstance(lst, nn.ModuleList) for block in lst]
        handles = [block.register_forward_pre_hook(check) for block in blocks or [tower]]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def vision_tower(self) -> nn.Module:
        inner = self.model.model
        return getattr(inner, "vision_tower", None) or inner.visual

    def estimate_image_groups(self, images: list[Image.Image]) -> list[tuple[list[int], int]]:
        """Per image: (merge-group sizes, tokens in no group) the encoder would produce, without running it."""
        raise NotImplementedError

    def estimate_video_groups(self, frames: list[Image.Image]) -> tuple[list[int], int]:
        raise NotImplementedError(f"{self.family} does not take video")

    # ---- positions ----------------------------------------------------------------------------
    def mrope_positions(self, full_ids: torch.Tensor, media: list[EncodedMedia]) -> torch.Tensor:
        """M-RoPE models: (3, 1, N) positions of the unmerged prompt `full_ids` (1, N)."""
        raise NotImplementedError

    # ---- helpers shared by families -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def normalize_frames(self, frames: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """Video frames for a square-input encoder: resize (bicubic), scale to [0, 1], normalise with the
        image processor's mean/std. Returns (T, 3, H, W)."""
        mean = np.asarray(self.image_processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_processor.image_std, dtype=np.float32)[:, None, None]
        out = []
        for frame in frames:
            arr = np.asarray(frame.convert("RGB").resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32)
            out.append((arr.transpose(2, 0, 1) / 255.0 - mean) / std)
        return torch.from_numpy(np.stack(out))


def square_input_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Decode size for an encoder that resizes every frame to `side` x `side` (aspect not kept): the source scaled
    down, aspect kept, until its shorter dimension is `side` — no dimension below what the resize needs."""
    scale = max(side / width, side / height)
    if scale >= 1:
        return width, height
    return max(side, round(width * scale)), max(side, round(height * scale))


def encoder_flops(vision_config, tokens: int, images: int) -> float:
    """Vision encoder FLOPs for `images` views of `tokens` tokens each (flops.vit_flops). Qwen2-VL's vision
    config names its width `embed_dim` (its `hidden_size` is the LLM's); Qwen2.5-VL's names its depth `depth`;
    DINOv2's gives its MLP width as `mlp_ratio`."""
    from ..flops import vit_flops

    if hasattr(vision_config, "embed_dim"):
        width = vision_config.embed_dim
        return vit_flops(width, int(width * vision_config.mlp_ratio), vision_config.depth, tokens, images)
    layers = getattr(vision_config, "depth", None) or vision_config.num_hidden_layers
    width = vision_config.hidden_size
    ffn = getattr(vision_config, "intermediate_size", None) or int(width * vision_config.mlp_ratio)
    return vit_flops(width, ffn, layers, tokens, images)
