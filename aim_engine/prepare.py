"""A request taken in at request level, once: its text checked, its media bytes decoded into images/frames under
the limits (or found in the feature cache), its prompt rendered through the chat template and tokenized, its cost
shape computed: one IngestedRequest that cost, admission, the sequence and the prefill all read. `prepare` then
turns it into LLM input: vision (vision.py) and the assembly (assembly.py). Knows the adapter, the tokenizer and
the media limits; nothing of the KV cache or the serving loop.

    media bytes ─decode─▶ images/frames ─vision─▶ projector features per item (+ merge groups)
    ─assemble (reduce, place)─▶ prompt embeddings with positions and the proportional-attention key bias
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from .adapters.base import EncodedMedia, FamilyAdapter
from .vision import encode_batch, join_slices
from .caches import Caches
from .cost import RequestShape
from .assembly import PreparedPrompt, assemble_prompt
from .errors import Cancelled, MediaError, RequestError
from .feature_cache import CachedMedia, FeatureCache, MediaKey
from .media import MediaLimits, read_image, read_video, image_info, rgb_bytes, video_decoded_bytes
from .plan import ReductionPlan
from .request import GenerationRequest, ImagePart, Part, TextPart, Timings, VideoPart


@dataclass
class IngestedRequest(GenerationRequest):
    """A request taken in once: its media decoded under the limits (or found in the feature cache), its text
    validated, its prompt rendered and tokenized, its cost shape known. Cost, admission, the sequence and the
    prefill all read this one value; none of them decodes, validates or tokenizes again.

    ids: the rendered prompt's token ids (each media item still one placeholder); shape: what its cost depends
    on under any plan."""

    ids: tuple[int, ...] = ()
    shape: RequestShape | None = None

    def pixel_bytes(self) -> int:
        """RGB bytes of the decoded images and frames it holds (3 a pixel, as the limits count them)."""
        total = 0
        for part in self.parts:
            if isinstance(part, ImagePart) and part.image is not None:
                total += rgb_bytes(*part.image.size)
            elif isinstance(part, VideoPart) and part.frames is not None:
                total += sum(rgb_bytes(*frame.size) for frame in part.frames)
        return total


class _MediaBudget:
    """What a request's decoded media may still take (`limits.max_decoded_bytes` less what is taken), what its
    videos may still decode (`limits.max_decoded_frames` less the frames decoded: the work, which the bytes do
    not bound), and the server's reservation of memory for what is held."""

    def __init__(self, limit: int, frames_limit: int, reserve: Callable[[int], None] | None):
        self.limit, self.left, self.reserve = limit, limit, reserve
        self.frames_left = frames_limit

    def take(self, nbytes: int, what: str, held: bool = True) -> None:
        """Counts `nbytes` of decoded media against the request's limit; `held`: and they will be in memory."""
        if nbytes > self.left:
            raise MediaError(MediaError.TOO_LARGE,
                             f"{what} takes {nbytes} bytes decoded; the request's decoded-media limit leaves "
                             f"{self.left} of {self.limit} bytes: send fewer or smaller media")
        if self.reserve is not None and held:
            self.reserve(nbytes)
        self.left -= nbytes


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

    def ingest(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None,
               reserve: Callable[[int], None] | None = None) -> IngestedRequest:
        """The request taken in once (IngestedRequest): its text checked first, then its media decoded (bytes ->
        images/frames, see read_media for the limits, `should_stop` and `reserve`), then the prompt rendered and
        tokenized and its cost shape computed. A request already decoded is returned as it is."""
        if isinstance(request, IngestedRequest):
            return request
        self.validate(request)
        decoded = GenerationRequest(self.read_media(request, should_stop, reserve), request.sampling,
                                    request.system, request.turns)
        ids = tuple(self.tokenizer(self.render_prompt(decoded), add_special_tokens=False)["input_ids"])
        return IngestedRequest(decoded.parts, request.sampling, request.system, request.turns, ids=ids,
                               shape=self._shape(decoded.parts, ids))

    def decoded_need(self, request: GenerationRequest) -> int:
        """The bytes of decoded media `read_media` will hold for the request, from the headers alone (nothing is
        decoded; a cached item counts as if decoded): what a server reserves at once, before decoding, so that no
        request waits for memory while it holds some. Refuses what read_media would refuse for its count or total
        size (RequestError, MediaError), before any decoding."""
        if isinstance(request, IngestedRequest):
            return 0
        self.validate(request)
        limits = self.limits
        self._check_items(request.parts)
        need = 0
        for part in request.parts:
            if isinstance(part, ImagePart) and part.image is None and part.data is not None:
                need += rgb_bytes(*image_info(part.data, part.mime_type, limits))
            elif isinstance(part, VideoPart) and part.frames is None and part.encoded_frames is not None:
                self._check_frames(part.encoded_frames)
                need += sum(rgb_bytes(*image_info(data, mime, limits)) for data, mime in part.encoded_frames)
            elif isinstance(part, VideoPart) and part.frames is None and part.data is not None:
                need += video_decoded_bytes(part.data, part.mime_type, part.num_frames, limits,
                                            self.adapter.video_frame_size)
        if need > limits.max_decoded_bytes:
            raise MediaError(MediaError.TOO_LARGE,
                             f"the request's media take {need} bytes decoded; the request's decoded-media limit is "
                             f"{limits.max_decoded_bytes} bytes: send fewer or smaller media, or fewer frames")
        return need

    def _check_items(self, parts: list[Part]) -> None:
        items = sum(isinstance(p, (ImagePart, VideoPart, CachedMedia)) for p in parts)
        if items > self.limits.max_items:
            raise RequestError(f"the request has {items} images and videos; the limit is {self.limits.max_items}")

    def read_media(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None,
                   reserve: Callable[[int], None] | None = None) -> list[Part]:
        """Bytes -> images/frames, validated against the limits. Each item's decoded size is known from its
        header before its pixels are decoded: the request's total is held to `limits.max_decoded_bytes`
        (MediaError), and each item's bytes are passed to `reserve` first (the server's memory budget: it may
        wait, or raise). The frames its videos decode are held to `limits.max_decoded_frames` (MediaError; a
        video is refused before decoding where its packets show it would pass what is left). `should_stop` is
        polled between items and while a video decodes (raises Cancelled)."""
        limits = self.limits
        self._check_items(request.parts)
        budget = _MediaBudget(limits.max_decoded_bytes, limits.max_decoded_frames, reserve)
        out = []
        for part in request.parts:
            if should_stop is not None and should_stop():
                raise Cancelled()
            if isinstance(part, ImagePart) and part.image is None:
                out.append(self._read_image(part, budget))
            elif isinstance(part, VideoPart) and part.frames is None and part.encoded_frames is not None:
                out.append(self._read_frames(part, budget, should_stop))
            elif isinstance(part, VideoPart) and part.frames is None:
                out.append(self._read_clip(part, budget, should_stop))
            else:
                if isinstance(part, VideoPart):
                    self._check_frames(part.frames)
                out.append(part)
        return out

    def _check_frames(self, frames: list) -> None:
        if not frames:
            raise RequestError("a video part has an empty list of frames")
        if len(frames) > self.limits.max_frames:
            raise RequestError(f"a video has {len(frames)} frames; the limit is {self.limits.max_frames}")

    def _cached(self, kind: str, key: MediaKey | None, budget: "_MediaBudget") -> CachedMedia | None:
        """A hit skips decoding, not the limits: it counts the decoded bytes it stands for, so a request is refused
        or served the same whether its media are in the cache or not (nothing is held for it). It decodes no
        frame, so it counts none against the decoded-frame limit, which bounds work done."""
        media = None if key is None else self.feature_cache.peek(key)
        if media is None:
            return None
        budget.take(media.decoded_bytes, f"a cached {kind}", held=False)
        return CachedMedia(kind, key, media)

    def _image(self, data: bytes, mime: str, what: str, budget: "_MediaBudget") -> Image.Image:
        width, height = image_info(data, mime, self.limits)
        budget.take(rgb_bytes(width, height), f"{what} of {width}x{height}")
        return read_image(data, mime, self.limits)

    def _read_image(self, part: ImagePart, budget: "_MediaBudget") -> Part:
        if part.data is None:
            raise RequestError("an image part has neither bytes nor a decoded image")
        key = self._cache_key("image", part.mime_type, [part.data])
        return self._cached("image", key, budget) or ImagePart(
            image=self._image(part.data, part.mime_type, "an image", budget), cache_key=key)

    def _read_frames(self, part: VideoPart, budget: "_MediaBudget", should_stop) -> Part:
        """A video sent as encoded frames."""
        self._check_frames(part.encoded_frames)
        key = self._cache_key("video", f"frames given, fps={part.fps}",
                              [f"{m}".encode() + d for d, m in part.encoded_frames])
        hit = self._cached("video", key, budget)
        if hit is not None:
            return hit
        frames = []
        for data, mime in part.encoded_frames:
            if should_stop is not None and should_stop():
                raise Cancelled()
            frames.append(self._image(data, mime, "a video frame", budget))
        return VideoPart(frames=frames, fps=part.fps, cache_key=key)

    def _read_clip(self, part: VideoPart, budget: "_MediaBudget", should_stop) -> Part:
        """A video file: only the frames sampling needs are decoded, within what the budget leaves (bytes held,
        frames decoded)."""
        if part.data is None:
            raise RequestError("a video part has neither bytes nor decoded frames")
        key = self._cache_key("video", f"{part.mime_type}, frames={part.num_frames}", [part.data])
        hit = self._cached("video", key, budget)
        if hit is not None:
            return hit
        clip = read_video(part.data, part.mime_type, part.num_frames, self.limits,
                          frame_size=self.adapter.video_frame_size, budget_bytes=budget.left,
                          should_stop=should_stop, reserve=budget.reserve, budget_frames=budget.frames_left)
        budget.left -= sum(rgb_bytes(*f.size) for f in clip.frames)
        budget.frames_left -= clip.decoded_frames
        return VideoPart(frames=clip.frames, fps=clip.fps, cache_key=key)

    def encode_media(self, parts: list[Part], should_stop: Callable[[], bool] | None = None) -> list[EncodedMedia]:
        return self.encode_batch([parts], should_stop)[0]

    def encode_batch(self, requests: list[list[Part]], should_stop: Callable[[], bool] | None = None
                     ) -> list[list[EncodedMedia]]:
        """Vision for several requests' decoded parts at once: all their videos go to the adapter together, and
        all their images (one pass through the tower each, where the family encodes items independently).
        `should_stop` is polled between the tower's blocks (raises Cancelled)."""
        with self.adapter.stoppable_vision(should_stop):
            return encode_batch(self.adapter, self.feature_cache, requests)

    def join_slices(self, part: VideoPart, slices: list[EncodedMedia]) -> EncodedMedia:
        """A video encoded in slices of its frames (encode_batch on each): the whole video's encoding."""
        return join_slices(self.adapter, self.feature_cache, part, slices)

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
        """`request`: an IngestedRequest (else taken in here: evaluation, tests). `media`: its media already through
        the vision tower (`encode_batch`); else encoded here, polling `should_stop` (raises Cancelled)."""
        timings = timings or Timings()
        if not isinstance(request, IngestedRequest):
            t0 = time.perf_counter()
            request = self.ingest(request, should_stop)
            timings.media_s = time.perf_counter() - t0
        plan.check_depth(self.num_layers)
        if media is None:
            t1 = time.perf_counter()
            media = self.encode_media(request.parts, should_stop)
            timings.vision_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        prepared = assemble_prompt(self.adapter, self.lm, torch.tensor(request.ids, dtype=torch.long), media, plan)
        timings.prefill_s = time.perf_counter() - t2  # merging counts as prefill; the LLM part is added to it
        return prepared

    def shape_of(self, request: GenerationRequest) -> RequestShape:
        """What a request's cost depends on, under any plan: its media's merge groups and its text length."""
        return self.ingest(request).shape

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
        placeholders = self.adapter.placeholder_ids
        return RequestShape(media=media, text_tokens=sum(t not in placeholders for t in ids))

    def decode_positions(self, prepared: PreparedPrompt, step: int) -> torch.Tensor:
        pos = torch.tensor([[prepared.next_position + step]], device=self.adapter.device)
        return pos[None].expand(3, 1, 1) if self.adapter.uses_mrope else pos
