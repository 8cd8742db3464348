"""Request preparation: media bytes -> images/frames -> vision features -> merged visual tokens placed in the
prompt's embeddings, with positions and the proportional-attention key bias. Knows the adapter, the tokenizer and
the media limits; nothing of the KV cache or the serving loop.

    media bytes ─decode─▶ images/frames ─adapter─▶ projector features per item (+ merge groups)
    ─merge─▶ fewer tokens per frame ─▶ prompt embeddings (placeholders expanded to the merged counts)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .adapters.base import EncodedMedia, FamilyAdapter
from .caches import Caches
from .cost import RequestShape
from .decoder import proportional_key_bias
from .errors import Cancelled, MediaError, RequestError
from .feature_cache import CachedMedia, FeatureCache, MediaKey
from .media import MediaLimits, decode_image, decode_video, image_info, rgb_bytes
from .merging import MergeResult, merged_rows
from .methods import REDUCERS
from .methods.base import passthrough
from .plan import ReductionPlan
from .request import GenerationRequest, ImagePart, Part, TextPart, Timings, VideoPart


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
    deepstack: torch.Tensor | None = None  # (levels, visual tokens, d): Qwen3-VL's DeepStack rows, merged as they
    blocks: torch.Tensor | None = None  # (n,): the bidirectional block of each token (Gemma 3's images), -1: none


@dataclass
class DecodedRequest(GenerationRequest):
    """A request taken in once: its media decoded under the limits (or found in the feature cache), its text
    validated, its prompt rendered and tokenized, its cost shape known. Cost, admission, the sequence and the
    prefill all read this one value; none of them decodes, validates or tokenizes again.

    ids: the rendered prompt's token ids (each media item still one placeholder); shape: what its cost depends
    on under any plan."""

    ids: tuple[int, ...] = ()
    shape: RequestShape | None = None


def _starts(counts: list[int]) -> list[tuple[int, int]]:
    """(first row, rows) of consecutive runs of `counts` rows."""
    out, start = [], 0
    for count in counts:
        out.append((start, count))
        start += count
    return out


class Preparer:
    def __init__(self, adapter: FamilyAdapter, limits: MediaLimits, num_layers: int, caches: Caches | None = None):
        self.adapter = adapter
        self.tokenizer = adapter.tokenizer
        self.limits = limits
        self.num_layers = num_layers
        self.lm = adapter.language_model()
        self.caches = caches or Caches()

    @property
    def feature_cache(self) -> FeatureCache | None:
        return self.caches.features

    def _cache_key(self, kind: str, sampling: str, chunks: list[bytes]) -> MediaKey | None:
        """The feature cache's key for media from these bytes, or None where they are not cached: no cache, or an
        image of a family whose image features depend on the other images of the prompt (LLaVA-OneVision)."""
        if self.feature_cache is None or (kind == "image" and not self.adapter.images_independent):
            return None
        return MediaKey.of(kind, sampling, chunks)

    def decode_request(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None,
                       reserve: Callable[[int], None] | None = None) -> GenerationRequest:
        """The request taken in once (DecodedRequest): its text checked first, then its media decoded (bytes ->
        images/frames, see decode_media for the limits, `should_stop` and `reserve`), then the prompt rendered and
        tokenized and its cost shape computed. A request already decoded is returned as it is."""
        if isinstance(request, DecodedRequest):
            return request
        self.validate(request)
        decoded = GenerationRequest(self.decode_media(request, should_stop, reserve), request.sampling,
                                    request.system, request.turns)
        ids = tuple(self.tokenizer(self.render_prompt(decoded), add_special_tokens=False)["input_ids"])
        return DecodedRequest(decoded.parts, request.sampling, request.system, request.turns, ids=ids,
                              shape=self._shape(decoded.parts, ids))

    def decode_media(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None,
                     reserve: Callable[[int], None] | None = None) -> list[Part]:
        """Bytes -> images/frames, validated against the limits. Each item's decoded size is known from its
        header before its pixels are decoded: the request's total is held to `limits.max_decoded_bytes`
        (MediaError), and each item's bytes are passed to `reserve` first (the server's memory budget: it may
        wait, or raise). `should_stop` is polled between items and while a video decodes (raises Cancelled)."""
        limits, out = self.limits, []
        left = limits.max_decoded_bytes

        def take(nbytes: int, what: str, held: bool = True) -> None:
            """Counts `nbytes` of decoded media against the request's limit; `held`: and they will be in memory."""
            nonlocal left
            if nbytes > left:
                raise MediaError(MediaError.TOO_LARGE,
                                 f"{what} takes {nbytes} bytes decoded; the request's decoded-media limit leaves "
                                 f"{left} of {limits.max_decoded_bytes} bytes: send fewer or smaller media")
            if reserve is not None and held:
                reserve(nbytes)
            left -= nbytes

        def cached(kind: str, key: MediaKey | None) -> CachedMedia | None:
            """A hit skips decoding, not the limits: it counts what decoding it took, so a request is refused or
            served the same whether its media are in the cache or not (nothing is held for it)."""
            media = None if key is None else self.feature_cache.peek(key)
            if media is None:
                return None
            take(media.decoded_bytes, f"a cached {kind}", held=False)
            return CachedMedia(kind, key, media)

        def image(data: bytes, mime: str, what: str) -> Image.Image:
            width, height = image_info(data, mime, limits)
            take(rgb_bytes(width, height), f"{what} of {width}x{height}")
            return decode_image(data, mime, limits)

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                raise Cancelled()

        items = sum(isinstance(p, (ImagePart, VideoPart, CachedMedia)) for p in request.parts)
        if items > limits.max_items:
            raise RequestError(f"the request has {items} images and videos; the limit is {limits.max_items}")
        for part in request.parts:
            check_stop()
            if isinstance(part, ImagePart) and part.image is None:
                if part.data is None:
                    raise RequestError("an image part has neither bytes nor a decoded image")
                key = self._cache_key("image", part.mime_type, [part.data])
                part = cached("image", key) or ImagePart(image=image(part.data, part.mime_type, "an image"),
                                                               cache_key=key)
            elif isinstance(part, VideoPart) and part.frames is None and part.encoded_frames is not None:
                if len(part.encoded_frames) > limits.max_frames:
                    raise RequestError(
                        f"a video has {len(part.encoded_frames)} frames; the limit is {limits.max_frames}")
                if not part.encoded_frames:
                    raise RequestError("a video part has an empty list of frames")
                key = self._cache_key("video", f"frames given, fps={part.fps}",
                                      [f"{m}".encode() + d for d, m in part.encoded_frames])
                hit = cached("video", key)
                if hit is not None:
                    out.append(hit)
                    continue
                frames = []
                for data, mime in part.encoded_frames:
                    check_stop()
                    frames.append(image(data, mime, "a video frame"))
                part = VideoPart(frames=frames, fps=part.fps, cache_key=key)
            elif isinstance(part, VideoPart) and part.frames is None:
                if part.data is None:
                    raise RequestError("a video part has neither bytes nor decoded frames")
                key = self._cache_key("video", f"{part.mime_type}, frames={part.num_frames}", [part.data])
                hit = cached("video", key)
                if hit is not None:
                    out.append(hit)
                    continue
                clip = decode_video(part.data, part.mime_type, part.num_frames, limits,
                                    frame_size=self.adapter.video_frame_size, budget_bytes=left,
                                    should_stop=should_stop, reserve=reserve)
                left -= sum(rgb_bytes(*f.size) for f in clip.frames)
                part = VideoPart(frames=clip.frames, fps=clip.fps, cache_key=key)
            elif isinstance(part, VideoPart):
                if not part.frames:
                    raise RequestError("a video part has an empty list of frames")
                if len(part.frames) > limits.max_frames:
                    raise RequestError(f"a video has {len(part.frames)} frames; the limit is {limits.max_frames}")
            out.append(part)
        return out

    def encode_media(self, parts: list[Part], should_stop: Callable[[], bool] | None = None) -> list[EncodedMedia]:
        return self.encode_batch([parts], should_stop)[0]

    def encode_batch(self, requests: list[list[Part]], should_stop: Callable[[], bool] | None = None
                     ) -> list[list[EncodedMedia]]:
        """Vision for several requests' decoded parts at once: all their videos go to the adapter together, and
        all their images (one pass through the tower each, where the family encodes items independently).
        `should_stop` is polled between the tower's blocks (raises Cancelled)."""
        with self.adapter.stoppable_vision(should_stop):
            return self._encode_batch(requests)

    def _encode_batch(self, requests: list[list[Part]]) -> list[list[EncodedMedia]]:
        """Each item is a cache hit (at decoding, or now: a request of the same batch or an earlier one computed
        it), or goes through the tower; an item that several requests of the batch share goes through once."""
        cache, adapter = self.feature_cache, self.adapter
        if any(isinstance(p, VideoPart) for parts in requests for p in parts) and not adapter.supports_video:
            raise RequestError(f"model family {adapter.family} does not accept video")
        items = [[p for p in parts if isinstance(p, (ImagePart, VideoPart, CachedMedia))] for parts in requests]
        resolved: dict[tuple[int, int], EncodedMedia] = {}
        videos: list[VideoPart] = []  # to encode, one per distinct key
        images: list[list[ImagePart]] = [[] for _ in requests]  # to encode, per prompt
        where: dict[tuple[int, int], tuple[str, int, int]] = {}  # item -> ("video", i, 0) | ("image", prompt, j)
        first: dict[bytes, tuple[int, int]] = {}  # a key -> the item that computes it in this batch
        shared: list[tuple[tuple[int, int], tuple[int, int]]] = []  # (item, the item computing it)
        for r, parts in enumerate(items):
            for i, part in enumerate(parts):
                if isinstance(part, CachedMedia):
                    resolved[r, i] = self._hit(part.key) or part.media
                    continue
                key = part.cache_key
                hit = None if key is None else self._hit(key)
                if hit is not None:
                    resolved[r, i] = hit
                elif key is not None and key.digest in first:
                    shared.append(((r, i), first[key.digest]))
                    continue
                elif isinstance(part, VideoPart):
                    where[r, i] = ("video", len(videos), 0)
                    videos.append(part)
                else:
                    where[r, i] = ("image", r, len(images[r]))
                    images[r].append(part)
                if key is not None and hit is None:
                    first[key.digest] = (r, i)
        start = time.perf_counter()
        encoded_videos = adapter.encode_videos([(p.frames, p.fps) for p in videos]) if videos else []
        encoded_images = adapter.encode_image_sets([[p.image for p in prompt] for prompt in images])
        seconds = time.perf_counter() - start
        for media, part in zip(encoded_videos, videos):  # where the family writes a video out in parts
            times = adapter.video_timestamps(len(part.frames), part.fps)
            if times is not None:
                media.extra["timestamps"] = times
        # the pass's time, shared by the items computed in proportion to their frames / images
        computed = [(m, p) for m, p in zip(encoded_videos, videos)] + [
            (m, p) for ms, ps in zip(encoded_images, images) for m, p in zip(ms, ps)]
        views = sum(len(p.frames) if isinstance(p, VideoPart) else 1 for _, p in computed) or 1
        for media, part in computed:
            media.vision_s = seconds * (len(part.frames) if isinstance(part, VideoPart) else 1) / views
            media.decoded_bytes = sum(rgb_bytes(*im.size) for im in (part.frames if isinstance(part, VideoPart)
                                                                     else [part.image]))
            if part.cache_key is not None:
                media.cache = "miss"
                cache.put(part.cache_key, media)
        for (r, i), (kind, a, b) in where.items():
            resolved[r, i] = encoded_videos[a] if kind == "video" else encoded_images[a][b]
        for item, computing in shared:  # computed once for the batch: a hit for every other request
            resolved[item] = self._hit(items[item[0]][item[1]].cache_key) or resolved[computing]
        return [[resolved[r, i] for i in range(len(parts))] for r, parts in enumerate(items)]

    def _hit(self, key: MediaKey) -> EncodedMedia | None:
        """A cache hit as this request's own view of the shared entry (marked, nothing copied)."""
        media = self.feature_cache.get(key) if self.feature_cache is not None else None
        return None if media is None else dataclasses.replace(media, cache="hit")

    def render_prompt(self, request: GenerationRequest, media: list[EncodedMedia] | None = None) -> str:
        """The prompt as text, a placeholder per media part. Where the family writes videos' times into it, they
        come from `media` (the encoded items) when given, else from the request's decoded parts."""
        def content(parts) -> list[dict]:
            return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                    {"type": p.kind if isinstance(p, CachedMedia) else "image" if isinstance(p, ImagePart)
                     else "video"} for p in parts]

        messages = []
        if request.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
        messages += [{"role": role, "content": content(parts)} for role, parts in request.messages()]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if media is not None:
            times = [m.extra.get("timestamps") for m in media if m.kind == "video"]
        else:
            videos = [p for p in request.parts
                      if isinstance(p, VideoPart) or isinstance(p, CachedMedia) and p.kind == "video"]
            if any(isinstance(p, VideoPart) and p.frames is None for p in videos):
                raise RequestError("the prompt's videos must be decoded (or encoded) before it is rendered")
            times = [p.media.extra.get("timestamps") if isinstance(p, CachedMedia)
                     else self.adapter.video_timestamps(len(p.frames), p.fps) for p in videos]
        return self.adapter.expand_media(prompt, times)

    def validate(self, request: GenerationRequest) -> None:
        """The request's text and turns (its plan is checked against the depth where it is applied)."""
        if not any(isinstance(p, TextPart) and p.text.strip() for p in request.parts):
            raise RequestError("the prompt has no text: add a question or instruction")
        request.messages()  # the turns split the parts as they say
        texts = [p.text for p in request.parts if isinstance(p, TextPart)] + [request.system or ""]
        for token in self.adapter.reserved_text:
            if any(token in text for text in texts):
                raise RequestError(f"the text contains {token!r}, one of the model's media placeholder tokens; "
                                   "send media as image or video parts")

    def prepare(self, request: GenerationRequest, plan: ReductionPlan, timings: Timings | None = None,
                media: list[EncodedMedia] | None = None, should_stop: Callable[[], bool] | None = None
                ) -> PreparedPrompt:
        """`request`: a DecodedRequest (else taken in here: evaluation, tests). `media`: its media already through
        the vision tower (`encode_batch`); else encoded here, polling `should_stop` (raises Cancelled)."""
        timings = timings or Timings()
        if not isinstance(request, DecodedRequest):
            t0 = time.perf_counter()
            request = self.decode_request(request, should_stop)
            timings.media_s = time.perf_counter() - t0
        plan.check_depth(self.num_layers)
        if media is None:
            t1 = time.perf_counter()
            media = self.encode_media(request.parts, should_stop)
            timings.vision_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        prepared = self._assemble(torch.tensor(request.ids, dtype=torch.long), media, plan)
        timings.prefill_s = time.perf_counter() - t2  # merging counts as prefill; the LLM part is added to it
        return prepared

    def _assemble(self, ids: torch.Tensor, media: list[EncodedMedia], plan: ReductionPlan) -> PreparedPrompt:
        """The prompt with each placeholder token replaced by its media rows as the plan reduced them. An item sits
        behind one placeholder, or several with text between them (`adapter.placeholder_spans`)."""
        spans = [(i, start, rows) for i, item in enumerate(media)
                 for start, rows in _starts(self.adapter.placeholder_spans(item))]
        is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
        for pid in {self.adapter.image_token_id, self.adapter.video_token_id} - {None}:
            is_placeholder |= ids == pid
        slots = torch.nonzero(is_placeholder).flatten().tolist()
        if len(slots) != len(spans):
            raise RequestError(
                f"the prompt has {len(slots)} media placeholders for {len(media)} media items taking {len(spans)}; "
                "text must not contain the model's image/video placeholder tokens")
        for slot, (i, _, _) in zip(slots, spans):
            if int(ids[slot]) != self.adapter.placeholder_id(media[i].kind):
                raise RequestError("media placeholders are out of order with the media items")

        device = self.adapter.device
        ids = ids.to(device)
        text_embeds = self.lm.embed_tokens(ids[None])[0]
        reduce = REDUCERS[plan.reducer].reduce
        merged: list[MergeResult] = [
            reduce(m.features, m.groups, plan.merge_target) if plan.merges else passthrough(m.features)
            for m in media
        ]
        deep = [None if m.deepstack is None else merged_rows(res, m.deepstack) for m, res in zip(media, merged)]
        pieces, visual, full_index, full_ids, token_sizes, deepstack, blocks = [], [], [], [], [], [], []
        start, offset = 0, 0  # offset: index in the full (unmerged) prompt
        for slot, span in zip(slots + [len(ids)], spans + [None]):
            if slot > start:
                n_text = slot - start
                pieces.append(text_embeds[start:slot])
                visual.append(torch.zeros(n_text, dtype=torch.bool, device=device))
                full_index.append(torch.arange(offset, offset + n_text, device=device))
                full_ids.append(ids[start:slot])
                token_sizes.append(torch.ones(n_text, device=device))
                blocks.append(torch.full((n_text,), -1, device=device))
                offset += n_text
            if span is None:
                break
            i, row0, rows = span
            res = merged[i]
            inside = (res.keep >= row0) & (res.keep < row0 + rows)
            pieces.append(res.features[inside].to(text_embeds.dtype))
            visual.append(torch.ones_like(inside)[inside])
            full_index.append(offset + res.keep[inside] - row0)
            full_ids.append(ids[slot].repeat(rows))
            token_sizes.append(res.sizes[inside].to(device=device, dtype=torch.float32))
            if deep[i] is not None:
                deepstack.append(deep[i][:, inside])
            blocks.append(torch.full_like(res.keep[inside], len(blocks)))  # a span is a block (where blocks apply)
            offset += rows
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
            deepstack=torch.cat(deepstack, dim=1).to(text_embeds.dtype) if deepstack else None,
            blocks=torch.cat(blocks) if self.adapter.bidirectional_media else None,
        )

    def shape_of(self, request: GenerationRequest) -> RequestShape:
        """What a request's cost depends on, under any plan: its media's merge groups and its text length."""
        return self.decode_request(request).shape

    def _shape(self, parts: list[Part], ids: tuple[int, ...]) -> RequestShape:
        images = [p.image for p in parts if isinstance(p, ImagePart)]
        per_image = iter(self.adapter.estimate_image_groups(images) if images else [])
        media = []
        for part in parts:
            if isinstance(part, CachedMedia):
                media.append(part.media.shape)
            elif isinstance(part, VideoPart):
                if not self.adapter.supports_video:
                    raise RequestError(f"model family {self.adapter.family} does not accept video")
                media.append(self.adapter.estimate_video_groups(part.frames))
            elif isinstance(part, ImagePart):
                media.append(next(per_image))
        placeholders = {self.adapter.image_token_id, self.adapter.video_token_id} - {None}
        return RequestShape(media=media, text_tokens=sum(t not in placeholders for t in ids))

    def decode_positions(self, prepared: PreparedPrompt, step: int) -> torch.Tensor:
        pos = torch.tensor([[prepared.next_position + step]], device=self.adapter.device)
        return pos[None].expand(3, 1, 1) if self.adapter.uses_mrope else pos
