"""Reuse of a prompt's prefix KV across requests: the next question about the same media starts after it.

When it is exact. Under a plan that does not prune, the K/V a layer holds for a prompt's first p tokens depend only
on those tokens' LLM input: their embeddings (merged visual tokens included: merging works per image or frame,
never on the question), their positions and their proportional-attention key bias. Pruning chooses what to drop
from attention that includes the question, so a pruning plan never reuses or offers a prefix.

The key is that input itself. The prefix is the prompt up to its last visual token (the system prompt, the chat
template's opening, the media), cut down to whole KV blocks; its key is a SHA-256 of the embeddings, positions and
bias of those tokens, with a BLAKE2b fingerprint compared on every hit. Two requests share a prefix exactly when
their LLM inputs agree on it, whatever the family, plan or media path that produced them.

Memory. An entry holds the blocks of its tokens at every layer in the serving pool (a hold, as a sequence holds
its own); a sequence that reuses it holds them too and writes its own tokens into blocks after them, so shared
blocks are never written. Entries count against `capacity_bytes` (least recently used evicted past it) and are
evicted when admission needs room (`KVPool.reclaim`); a block is free once no entry or sequence holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..feature_cache import fingerprints
from ..kv_pool import KVPool, SequenceKV


@dataclass(frozen=True)
class PrefixKey:
    digest: bytes
    check: bytes
    tokens: int


@dataclass
class PrefixEntry:
    key: PrefixKey
    blocks: list[list[int]]  # per layer
    has_bias: list[bool]

    @property
    def num_blocks(self) -> int:
        return sum(map(len, self.blocks))


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    collisions: int = 0
    tokens_reused: int = 0


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()


@dataclass
class PrefixCache:
    pool: KVPool
    capacity_bytes: int
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self):
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self._blocks = 0
        self.pool.reclaim = self.evict_blocks

    @property
    def bytes(self) -> int:
        return self._blocks * self.pool.block_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def key_for(self, embeds: torch.Tensor, position_ids: torch.Tensor, is_visual: torch.Tensor,
                key_bias: torch.Tensor | None, deepstack: torch.Tensor | None = None,
                blocks: torch.Tensor | None = None) -> PrefixKey | None:
        """The key of a prompt's reusable prefix (embeds (1, n, d), position_ids (1, n) or (3, 1, n), and the
        DeepStack rows (levels, v, d) its visual tokens' K/V also depend on), or None if it has none: no visual
        token, or fewer tokens before its last one than a block. Where the prefix ends inside a bidirectional
        block (`blocks`, Gemma 3's images), its tokens also attended to the rest of the block: the key covers it."""
        visual = torch.nonzero(is_visual).flatten()
        if visual.numel() == 0:
            return None
        bs = self.pool.block_size
        # whole blocks up to the last visual token, and at least one token left for the prefill to compute
        tokens = min(int(visual[-1]) + 1, embeds.shape[1] - 1) // bs * bs
        if tokens == 0:
            return None
        seen = tokens  # the tokens the prefix's K/V depend on
        if blocks is not None and blocks[tokens - 1] >= 0:
            seen = int(torch.nonzero(blocks == blocks[tokens - 1]).max()) + 1
        parts = [str(embeds.dtype).encode(), _bytes_of(embeds[0, :seen]), _bytes_of(position_ids[..., :seen]),
                 b"no bias" if key_bias is None else _bytes_of(key_bias[:seen])]
        if blocks is not None:
            parts.append(_bytes_of(blocks[:seen]))
        if deepstack is not None:
            parts.append(_bytes_of(deepstack[:, :int(is_visual[:tokens].sum())]))
        return PrefixKey(*fingerprints(parts), tokens)

    def lookup(self, key: PrefixKey) -> PrefixEntry | None:
        entry = self._entries.get(key.digest)
        if entry is not None and entry.key != key:  # same digest, other input: never reuse it
            self.stats.collisions += 1
            self._evict(key.digest)
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key.digest)
        self.stats.hits += 1
        self.stats.tokens_reused += key.tokens
        return entry

    def attach(self, entry: PrefixEntry, kv: SequenceKV) -> int:
        """Starts `kv` (reserved, empty) with the entry's prefix; returns the tokens reused."""
        kv.attach_prefix(entry.blocks, entry.key.tokens, entry.has_bias)
        return entry.key.tokens

    def offer(self, key: PrefixKey, kv: SequenceKV) -> None:
        """After a prefill that did not reuse `key`: keeps the first `key.tokens` tokens of `kv` as an entry."""
        if key.digest in self._entries:
            return
        bs = self.pool.block_size
        blocks = [list(layer[:key.tokens // bs]) for layer in kv.blocks]
        entry = PrefixEntry(key, blocks, list(kv.has_bias))
        if entry.num_blocks * self.pool.block_bytes > self.capacity_bytes:
            return
        while (self._blocks + entry.num_blocks) * self.pool.block_bytes > self.capacity_bytes:
            self._evict(next(iter(self._entries)))
        self.pool.retain([b for layer in blocks for b in layer])
        self._entries[key.digest] = entry
        self._blocks += entry.num_blocks

    def evictable_blocks(self) -> int:
        """Blocks that only the cache holds: what evicting everything would free now. Read from other threads (the
        controller's memory signal): the entries are copied in one step first."""
        refs, entries = self.pool._refs, list(self._entries.values())
        return sum(refs[b] == 1 for entry in entries for layer in entry.blocks for b in layer)

    def evict_blocks(self, needed: int) -> None:
        """Evicts least recently used entries until `needed` blocks were freed or none is left (an entry whose
        blocks a running sequence also holds frees nothing until that sequence ends)."""
        free_before = self.pool.free_blocks
        while self._entries and self.pool.free_blocks - free_before < needed:
            self._evict(next(iter(self._entries)))

    def _evict(self, digest: bytes) -> None:
        entry = self._entries.pop(digest)
        self.pool.drop([b for layer in entry.blocks for b in layer])
        self._blocks -= entry.num_blocks
        self.stats.evictions += 1
