"""A content-addressed cache of visual features: an image's or a video's projector output (before merging, so any
plan reuses it), keyed by the media bytes and how they were sampled, bounded in bytes, least recently used out.

Backend services ask several questions about the same media; after AIM cuts the LLM prefill, decoding the media and
the vision tower are most of a repeated request, and AIM does not reduce them. A hit skips both.

Keys. `MediaKey.digest` (SHA-256) addresses the entry; `check` (BLAKE2b over the same input) and `size` are stored
with it and compared on every hit, so features are never returned for other bytes even if two inputs shared a
digest: a mismatch is counted as a collision and treated as a miss. The input is the media kind, its MIME type
(so a type the engine refuses is refused whether cached or not), how it is sampled (frames asked for) and the bytes.
One cache belongs to one model.

Limits. A hit skips decoding, not the request's limits: it counts the decoded bytes its computation took against
the request's decoded-media limit, so a request is served or refused the same whether its media are cached or not.

Sharing. An entry's `EncodedMedia` is shared by every request that hits it and must never be written to; merging
and placement read it and build new tensors. A request holding an evicted entry keeps it alive until it ends, so
the bytes held can exceed the budget by what in-flight requests hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from .adapters.base import EncodedMedia

CPU_DEFAULT_BYTES = 512 * 1024**2
CUDA_DEFAULT_SHARE = 0.05  # of the device's memory; the KV pool's default leaves 15% + 2 GiB outside itself


def default_capacity_bytes(device) -> int:
    """The default budget: 512 MiB on CPU; on CUDA 5% of the device's memory (7 GiB on an H200)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(CUDA_DEFAULT_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return CPU_DEFAULT_BYTES


def fingerprints(chunks: list[bytes]) -> tuple[bytes, bytes]:
    """(SHA-256, BLAKE2b-128) of a sequence of byte strings, each prefixed by its length so that the boundaries are
    part of the input: the address of a cache entry and the independent check compared on every hit."""
    sha, blake = hashlib.sha256(), hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        length = len(chunk).to_bytes(8, "little")
        for h in (sha, blake):
            h.update(length)
            h.update(chunk)
    return sha.digest(), blake.digest()


@dataclass(frozen=True)
class MediaKey:
    digest: bytes  # SHA-256: the address
    check: bytes  # BLAKE2b-128 of the same input: a second, independent fingerprint
    size: int  # bytes of media

    @classmethod
    def of(cls, kind: str, sampling: str, chunks: list[bytes]) -> "MediaKey":
        digest, check = fingerprints([f"{kind}\0{sampling}".encode(), *chunks])
        return cls(digest, check, sum(map(len, chunks)))


@dataclass(frozen=True)
class CachedMedia:
    """A request part whose features came from the cache at decoding: it skips decoding and the vision tower."""

    kind: str  # "image" | "video"
    key: MediaKey
    media: EncodedMedia


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    collisions: int = 0
    saved_seconds: float = 0.0  # vision seconds the hits did not spend


@dataclass
class _Entry:
    key: MediaKey
    media: EncodedMedia
    nbytes: int


def media_bytes(media: EncodedMedia) -> int:
    """Device bytes an entry holds: its features, DeepStack features, merge-group indices and grid."""
    tensors = [media.features, *media.groups] + [t for t in (media.grid_thw, media.deepstack) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class FeatureCache:
    capacity_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: MediaKey) -> EncodedMedia | None:
        """The entry if present, without counting a hit or a miss (media decoding asks whether it may skip)."""
        with self._lock:
            entry = self._find(key)
            return None if entry is None else entry.media

    def get(self, key: MediaKey) -> EncodedMedia | None:
        """The features for `key` as a hit (counted, most recently used), or None (a miss is counted by `put`)."""
        with self._lock:
            entry = self._find(key)
            if entry is None:
                return None
            self._entries.move_to_end(key.digest)
            self.stats.hits += 1
            self.stats.saved_seconds += entry.media.vision_s
            return entry.media

    def put(self, key: MediaKey, media: EncodedMedia) -> None:
        """Computed features (a miss). Evicts the least recently used entries to stay within the budget; an item
        larger than the whole budget is not kept."""
        nbytes = media_bytes(media)
        with self._lock:
            self.stats.misses += 1
            old = self._entries.pop(key.digest, None)
            if old is not None:
                self._bytes -= old.nbytes
            if nbytes > self.capacity_bytes:
                return
            while self._bytes + nbytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evictions += 1
            self._entries[key.digest] = _Entry(key, dataclasses.replace(media, cache=""), nbytes)
            self._bytes += nbytes

    def _find(self, key: MediaKey) -> _Entry | None:
        entry = self._entries.get(key.digest)
        if entry is None:
            return None
        if entry.key != key:  # same digest, other bytes: never serve it
            self.stats.collisions += 1
            del self._entries[key.digest]
            self._bytes -= entry.nbytes
            return None
        return entry
