"""Vision batching with the feature cache: the media of the requests admitted together go through the tower in
one pass where the family allows, each distinct item once, and what is computed goes into the cache."""

from __future__ import annotations

import dataclasses
import time

from .adapters.base import EncodedMedia, FamilyAdapter
from .errors import RequestError
from .feature_cache import CachedMedia, FeatureCache, MediaKey
from .media import rgb_bytes
from .request import ImagePart, Part, VideoPart


def encode_batch(adapter: FamilyAdapter, cache: FeatureCache | None, requests: list[list[Part]]
                 ) -> list[list[EncodedMedia]]:
    """The vision tower for several requests' decoded parts at once (the caller holds `adapter.stoppable_vision`).
    Each item is a cache hit (at decoding, or now: a request of the same batch or an earlier one computed
    it), or goes through the tower; an item that several requests of the batch share goes through once."""
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
                resolved[r, i] = _hit(cache, part.key) or part.media
                continue
            key = part.cache_key
            hit = None if key is None else _hit(cache, key)
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
    # the pass's time, shared by the items computed in proportion to their frames / images
    computed = [(m, p) for m, p in zip(encoded_videos, videos)] + [
        (m, p) for ms, ps in zip(encoded_images, images) for m, p in zip(ms, ps)]
    views = sum(len(p.frames) if isinstance(p, VideoPart) else 1 for _, p in computed) or 1
    for media, part in computed:
        media.vision_s = seconds * (len(part.frames) if isinstance(part, VideoPart) else 1) / views
        _computed(adapter, cache, media, part)
    for (r, i), (kind, a, b) in where.items():
        resolved[r, i] = encoded_videos[a] if kind == "video" else encoded_images[a][b]
    for item, computing in shared:  # computed once for the batch: a hit for every other request
        resolved[item] = _hit(cache, items[item[0]][item[1]].cache_key) or resolved[computing]
    return [[resolved[r, i] for i in range(len(parts))] for r, parts in enumerate(items)]

def join_slices(adapter: FamilyAdapter, cache: FeatureCache | None, part: VideoPart,
                slices: list[EncodedMedia]) -> EncodedMedia:
    """A video encoded over several passes, a slice of `adapter.video_slice_frames` multiple at a time (each slice
    sent to encode_batch as a video of its own, uncached): the whole video's encoding, kept in the cache."""
    media = adapter.join_video(slices)
    _computed(adapter, cache, media, part)
    return media


def _computed(adapter: FamilyAdapter, cache: FeatureCache | None, media: EncodedMedia, part: ImagePart | VideoPart
              ) -> None:
    """An item the tower computed: the times of its parts (where the family writes a video out in parts), the
    pixels it came from, and its place in the cache."""
    if isinstance(part, VideoPart):
        times = adapter.video_timestamps(len(part.frames), part.fps)
        if times is not None:
            media.extra["timestamps"] = times
    media.decoded_bytes = sum(rgb_bytes(*im.size) for im in (part.frames if isinstance(part, VideoPart)
                                                             else [part.image]))
    if part.cache_key is not None:
        media.cache = "miss"
        cache.put(part.cache_key, media)


def _hit(cache: FeatureCache | None, key: MediaKey) -> EncodedMedia | None:
    """A cache hit as this request's own view of the shared entry (marked, nothing copied)."""
    media = cache.get(key) if cache is not None else None
    return None if media is None else dataclasses.replace(media, cache="hit")
