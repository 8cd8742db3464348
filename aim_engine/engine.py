"""The engine: a request and a ReductionPlan in, streamed tokens and per-request stats out.

    media bytes ─decode─▶ images/frames ─adapter─▶ projector features per item (+ merge groups)
    ─merge─▶ fewer tokens per frame ─▶ prompt embeddings (placeholders expanded to the merged counts)
    ─prefill with pruning─▶ KV cache ─decode loop─▶ tokens
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from .adapters import adapter_for_config
from .adapters.base import EncodedMedia, FamilyAdapter
from .decoder import ATTENTION_IMPL, proportional_key_bias
from .errors import ModelLoadError, RequestError
from .flops import LLMShape, prefill_flops
from .media import MediaLimits, decode_image, decode_video
from .merging import MergeResult
from .methods import REDUCERS
from .methods.base import passthrough
from .plan import PLAN_FILE, PlanError, ReductionPlan, plan_from_dict
from .request import (GenerationRequest, GenerationResult, ImagePart, Part, RequestStats, TextPart, Timings,
                      TokenDelta, VideoPart)
from .serving.kv_pool import KVLayout, KVPool
from .serving.loop import ServingLoop
from .serving.sequence import Sequence

# KV pool of a model on CPU when no budget is given. The pool is allocated untouched (torch.empty), so the
# budget costs memory only as sequences fill it.
DEFAULT_CPU_KV_BYTES = 2 * 2**30
# On CUDA without a budget: this share of the device memory free after loading, less room for activations.
CUDA_KV_FREE_SHARE = 0.85
CUDA_ACTIVATION_HEADROOM_BYTES = 2 * 2**30
DEFAULT_MAX_BATCH = 32
# Prompt tokens prefilled per engine step (at least one sequence): bounds how long running sequences wait for
# a decode step while newcomers are prefilled.
DEFAULT_PREFILL_TOKENS_PER_STEP = 8192


def default_kv_cache_bytes(device: torch.device) -> int:
    """--kv-cache-bytes when not given: a fixed budget on CPU; on CUDA from the memory free after loading."""
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(256 * 2**20, int(CUDA_KV_FREE_SHARE * free) - CUDA_ACTIVATION_HEADROOM_BYTES)


@dataclass
class PreparedPrompt:
    """A request turned into LLM input, before prefill."""

    embeds: torch.Tensor  # (1, n, d)
    position_ids: torch.Tensor  # (1, n) or (3, 1, n)
    is_visual: torch.Tensor  # (n,) bool
    next_position: int  # position id of the first generated token
    key_bias: torch.Tensor | None  # (n,) log of how many input tokens each token stands for; None: plain attention
    text_tokens: int
    visual_in: int
    media: list[EncodedMedia]


@dataclass
class CostEstimate:
    """What a request would cost under a plan, computed without running any model."""

    visual_tokens_in: int
    visual_tokens_merged: int
    text_tokens: int
    prefill_flops_baseline: float
    prefill_flops: float
    visual_tokens_per_layer: list[int]


@dataclass
class RequestShape:
    """Per media item (merge-group sizes, tokens in no group), and the prompt's text tokens."""

    media: list[tuple[list[int], int]]
    text_tokens: int


def read_default_plan(path: Path) -> ReductionPlan | None:
    """The default plan stored in a checkpoint directory (PLAN_FILE), or None if there is none."""
    file = Path(path) / PLAN_FILE
    if not file.is_file():
        return None
    try:
        return plan_from_dict(json.loads(file.read_text())["default_plan"])
    except (ValueError, KeyError, TypeError) as exc:  # PlanError and JSONDecodeError are ValueErrors
        raise ModelLoadError(f"{file} does not hold a valid default plan: {exc}") from None


class AimEngine:
    """One model: request preparation (media, vision, merging, prompt), cost, and the serving loop that runs
    many requests' prefills and batched decode steps over one KV pool.

    kv_cache_bytes: the KV pool's budget (None: `default_kv_cache_bytes`); max_batch: most sequences decoding
    together (1 serves one request at a time)."""

    def __init__(self, adapter: FamilyAdapter, name: str = "model", limits: MediaLimits = MediaLimits(),
                 default_plan: ReductionPlan | None = None, kv_cache_bytes: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_tokens_per_step: int = DEFAULT_PREFILL_TOKENS_PER_STEP):
        self.adapter = adapter
        self.name = name
        self.limits = limits
        self.lm = adapter.language_model()
        self.shape = LLMShape.from_config(adapter.text_config)
        if default_plan is not None:
            try:
                default_plan.check_depth(self.shape.layers)
            except PlanError as exc:
                raise ModelLoadError(f"the checkpoint's default plan does not fit the model: {exc}") from None
        self._default_plan = default_plan
        self.tokenizer = adapter.tokenizer
        gen_cfg = getattr(adapter.model, "generation_config", None)
        eos = {self.tokenizer.eos_token_id}
        if gen_cfg is not None and gen_cfg.eos_token_id is not None:
            eos |= set(gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id])
        self.eos_ids = {e for e in eos if e is not None}
        layout = KVLayout.from_config(adapter.text_config, adapter.dtype)
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_cache_bytes(adapter.device)
        self.pool = KVPool(layout, budget, device=adapter.device)
        self.loop = ServingLoop(self, max_batch, prefill_tokens_per_step)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
             limits: MediaLimits = MediaLimits(), kv_cache_bytes: int | None = None,
             max_batch: int = DEFAULT_MAX_BATCH) -> "AimEngine":
        """Loads a checkpoint directory (never the hub): model, tokenizer, image processor, chat template."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        adapter_cls, model_cls = adapter_for_config(config)
        model = model_cls.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32,
                                          attn_implementation="sdpa").to(device).eval()
        model.config.text_config._attn_implementation = ATTENTION_IMPL
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        template = path / "chat_template.jinja"
        if template.is_file() and not tokenizer.chat_template:
            tokenizer.chat_template = template.read_text()
        return cls(adapter_cls(model, tokenizer, image_processor), name=path.name, limits=limits,
                   default_plan=read_default_plan(path), kv_cache_bytes=kv_cache_bytes, max_batch=max_batch)

    # ---- plan helpers ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.shape.layers

    def default_plan(self) -> ReductionPlan:
        """The checkpoint's own calibrated plan (PLAN_FILE) if it has one, else the paper's for this depth."""
        return self._default_plan or ReductionPlan.default_for_depth(self.num_layers)

    # ---- preparing the prompt -------------------------------------------------------------------
    def decode_media(self, request: GenerationRequest) -> list[Part]:
        """Bytes -> images/frames, validated against the limits."""
        out: list[Part] = []
        for part in request.parts:
            if isinstance(part, ImagePart) and part.image is None:
                if part.data is None:
                    raise RequestError("an image part has neither bytes nor a decoded image")
                part = ImagePart(image=decode_image(part.data, part.mime_type, self.limits))
            elif isinstance(part, VideoPart) and part.frames is None and part.encoded_frames is not None:
                if len(part.encoded_frames) > self.limits.max_frames:
                    raise RequestError(
                        f"a video has {len(part.encoded_frames)} frames; the limit is {self.limits.max_frames}")
                if not part.encoded_frames:
                    raise RequestError("a video part has an empty list of frames")
                part = VideoPart(frames=[decode_image(data, mime, self.limits) for data, mime in part.encoded_frames],
                                 fps=part.fps)
            elif isinstance(part, VideoPart) and part.frames is None:
                if part.data is None:
                    raise RequestError("a video part has neither bytes nor decoded frames")
                clip = decode_video(part.data, part.mime_type, part.num_frames, self.limits)
                part = VideoPart(frames=clip.frames, fps=clip.fps)
            elif isinstance(part, VideoPart):
                if not part.frames:
                    raise RequestError("a video part has an empty list of frames")
                if len(part.frames) > self.limits.max_frames:
                    raise RequestError(f"a video has {len(part.frames)} frames; the limit is {self.limits.max_frames}")
            out.append(part)
        return out

    def encode_media(self, parts: list[Part]) -> list[EncodedMedia]:
        images = [p.image for p in parts if isinstance(p, ImagePart)]
        encoded_images = iter(self.adapter.encode_images(images) if images else [])
        media = []
        for part in parts:
            if isinstance(part, ImagePart):
                media.append(next(encoded_images))
            elif isinstance(part, VideoPart):
                if not self.adapter.supports_video:
                    raise RequestError(f"model family {self.adapter.family} does not accept video")
                media.append(self.adapter.encode_video(part.frames, part.fps))
        return media

    def render_prompt(self, request: GenerationRequest) -> str:
        content = []
        for part in request.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                content.append({"type": "image" if isinstance(part, ImagePart) else "video"})
        messages = []
        if request.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _validate(self, request: GenerationRequest, plan: ReductionPlan) -> None:
        if not any(isinstance(p, TextPart) and p.text.strip() for p in request.parts):
            raise RequestError("the prompt has no text: add a question or instruction")
        plan.check_depth(self.num_layers)

    def prepare(self, request: GenerationRequest, plan: ReductionPlan, timings: Timings | None = None
                ) -> PreparedPrompt:
        timings = timings or Timings()
        self._validate(request, plan)
        t0 = time.perf_counter()
        parts = self.decode_media(request)
        t1 = time.perf_counter()
        media = self.encode_media(parts)
        t2 = time.perf_counter()
        timings.media_s, timings.vision_s = t1 - t0, t2 - t1
        prompt = self.render_prompt(request)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        prepared = self._assemble(ids, media, plan)
        timings.prefill_s = time.perf_counter() - t2  # merging counts as prefill; the LLM part is added to it
        return prepared

    def _assemble(self, ids: torch.Tensor, media: list[EncodedMedia], plan: ReductionPlan) -> PreparedPrompt:
        is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
        for pid in {self.adapter.image_token_id, self.adapter.video_token_id} - {None}:
            is_placeholder |= ids == pid
        slots = torch.nonzero(is_placeholder).flatten().tolist()
        if len(slots) != len(media):
            raise RequestError(
                f"the prompt has {len(slots)} media placeholders for {len(media)} media items; "
                "text must not contain the model's image/video placeholder tokens")
        for slot, item in zip(slots, media):
            if int(ids[slot]) != self.adapter.placeholder_id(item.kind):
                raise RequestError("media placeholders are out of order with the media items")

        device = self.adapter.device
        ids = ids.to(device)
        text_embeds = self.lm.embed_tokens(ids[None])[0]
        reduce = REDUCERS[plan.reducer].reduce
        merged: list[MergeResult] = [
            reduce(m.features, m.groups, plan.merge_target) if plan.merges else passthrough(m.features)
            for m in media
        ]
        pieces, visual, full_index, full_ids, token_sizes = [], [], [], [], []
        start, offset = 0, 0  # offset: index in the full (unmerged) prompt
        for slot, item, res in zip(slots + [len(ids)], media + [None], merged + [None]):
            if slot > start:
                n_text = slot - start
                pieces.append(text_embeds[start:slot])
                visual.append(torch.zeros(n_text, dtype=torch.bool, device=device))
                full_index.append(torch.arange(offset, offset + n_text, device=device))
                full_ids.append(ids[start:slot])
                token_sizes.append(torch.ones(n_text, device=device))
                offset += n_text
            if item is None:
                break
            pieces.append(res.features.to(text_embeds.dtype))
            visual.append(torch.ones(res.keep.numel(), dtype=torch.bool, device=device))
            full_index.append(offset + res.keep)
            full_ids.append(ids[slot].repeat(item.features.shape[0]))
            token_sizes.append(res.sizes.to(device=device, dtype=torch.float32))
            offset += item.features.shape[0]
            start = slot + 1

        embeds = torch.cat(pieces)[None]
        is_visual = torch.cat(visual)
        n = embeds.shape[1]
        if self.adapter.uses_mrope:
            full_pos = self.adapter.mrope_positions(torch.cat(full_ids)[None], media)
            position_ids = full_pos.index_select(-1, torch.cat(full_index))
            next_position = int(full_pos.max()) + 1
        elif plan.positions == "original":
            position_ids = torch.cat(full_index)[None]
            next_position = offset
        else:
            position_ids = torch.arange(n, device=device)[None]
            next_position = n
        key_bias = None
        if plan.proportional_attention and plan.merges:
            sizes = torch.cat(token_sizes)
            if bool((sizes > 1).any()):  # all ones: the bias is 0 and the kernel can stay causal
                key_bias = proportional_key_bias(sizes)
        return PreparedPrompt(
            embeds=embeds, position_ids=position_ids, is_visual=is_visual, next_position=next_position,
            key_bias=key_bias,
            text_tokens=int((~is_visual).sum()), visual_in=sum(m.features.shape[0] for m in media), media=media,
        )

    def estimate(self, request: GenerationRequest, plan: ReductionPlan) -> CostEstimate:
        """Token counts and LLM prefill FLOPs of `request` under `plan`; media are decoded (to know sizes and
        frame counts) but nothing is encoded. Raises the same errors as generate() for bad input."""
        plan.check_depth(self.num_layers)
        return self.cost(self.shape_of(request), plan)

    def shape_of(self, request: GenerationRequest) -> "RequestShape":
        """What a request's cost depends on, under any plan: its media's merge groups and its text length."""
        self._validate(request, ReductionPlan())
        parts = self.decode_media(request)
        images = [p.image for p in parts if isinstance(p, ImagePart)]
        per_image = iter(self.adapter.estimate_image_groups(images) if images else [])
        media = []
        for part in parts:
            if isinstance(part, VideoPart):
                if not self.adapter.supports_video:
                    raise RequestError(f"model family {self.adapter.family} does not accept video")
                media.append(self.adapter.estimate_video_groups(part.frames))
            elif isinstance(part, ImagePart):
                media.append(next(per_image))
        ids = self.tokenizer(self.render_prompt(request), add_special_tokens=False)["input_ids"]
        return RequestShape(media=media, text_tokens=len(ids) - len(media))

    def cost(self, shape: "RequestShape", plan: ReductionPlan) -> CostEstimate:
        """Token counts and LLM prefill FLOPs of a request of this shape under `plan` (pure arithmetic)."""
        kept = REDUCERS[plan.reducer].kept if plan.merges else (lambda sizes, _: sum(sizes))
        visual_in = sum(sum(groups) + loose for groups, loose in shape.media)
        visual_merged = sum(kept(groups, plan.merge_target) + loose for groups, loose in shape.media)
        text = shape.text_tokens
        per_layer = plan.visual_tokens_per_layer(visual_merged, self.num_layers)
        return CostEstimate(
            visual_tokens_in=visual_in, visual_tokens_merged=visual_merged, text_tokens=text,
            prefill_flops_baseline=prefill_flops(self.shape, [text + visual_in] * self.num_layers),
            prefill_flops=prefill_flops(self.shape, [text + v for v in per_layer]),
            visual_tokens_per_layer=per_layer,
        )

    def decode_positions(self, prepared: PreparedPrompt, step: int) -> torch.Tensor:
        pos = torch.tensor([[prepared.next_position + step]], device=self.adapter.device)
        return pos[None].expand(3, 1, 1) if self.adapter.uses_mrope else pos

    # ---- running --------------------------------------------------------------------------------
    def kv_tokens(self, request: GenerationRequest, plan: ReductionPlan) -> list[int]:
        """Per layer, the most tokens the request can hold in the KV cache under `plan`: its prompt after
        merging and the plan's pruning, plus max_new_tokens - 1 generated ones (the last is never fed back).
        `request` must hold decoded media (`decode_request`)."""
        est = self.cost(self.shape_of(request), plan)
        extra = request.sampling.max_new_tokens - 1
        return [est.text_tokens + v + extra for v in est.visual_tokens_per_layer]

    def decode_request(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its media decoded (bytes -> images/frames), validated against the limits."""
        return GenerationRequest(self.decode_media(request), request.sampling, request.system)

    def sequence(self, request: GenerationRequest, plan: ReductionPlan, emit: Callable[[object], None],
                 should_stop: Callable[[], bool] | None = None) -> Sequence:
        """A sequence for the serving loop; `request` must hold decoded media. Raises the request's errors."""
        self._validate(request, plan)
        return Sequence(request=request, plan=plan, kv_tokens=self.kv_tokens(request, plan), emit=emit,
                        stats=RequestStats(), should_stop=should_stop)

    def stream(self, request: GenerationRequest, plan: ReductionPlan | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[TokenDelta | GenerationResult]:
        """Yields TokenDelta as text becomes final, then one GenerationResult, driving the serving loop on this
        thread (other requests in the loop advance with it). `should_stop` is polled between prefill layers
        and before every decode step; when it returns True generation ends with finish_reason 'cancelled'."""
        plan = plan or ReductionPlan()
        t0 = time.perf_counter()
        request = self.decode_request(request)
        media_s = time.perf_counter() - t0
        events: list = []
        seq = self.sequence(request, plan, events.append, should_stop)
        seq.arrival = t0
        self.loop.add(seq)
        try:
            while True:
                if not events:
                    self.loop.step()
                while events:
                    event = events.pop(0)
                    if isinstance(event, BaseException):
                        raise event
                    if isinstance(event, GenerationResult):
                        event.stats.timings.media_s += media_s
                    yield event
                    if isinstance(event, GenerationResult):
                        return
        finally:
            self.loop.cancel(seq)  # a caller that stops iterating early frees the sequence's KV at once

    def generate(self, request: GenerationRequest, plan: ReductionPlan | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        for event in self.stream(request, plan, should_stop):
            if isinstance(event, GenerationResult):
                return event
        raise AssertionError("stream ended without a result")

    def _fill_prefill_stats(self, stats: RequestStats, prepared: PreparedPrompt, tokens_per_layer: list[int],
                            visual_per_layer: list[int]) -> None:
        stats.prompt_tokens = prepared.embeds.shape[1]
        stats.visual_tokens_in = prepared.visual_in
        stats.visual_tokens_merged = int(prepared.is_visual.sum())
        stats.visual_tokens_per_layer = visual_per_layer
        stats.prefill_flops_baseline = prefill_flops(
            self.shape, [prepared.text_tokens + prepared.visual_in] * self.num_layers)
        stats.prefill_flops = prefill_flops(self.shape, tokens_per_layer)
        stats.vision_flops = sum(m.vision_flops for m in prepared.media)
