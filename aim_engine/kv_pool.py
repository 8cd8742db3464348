"""KV memory as a pool of fixed-size blocks under a byte budget, held per (sequence, layer).

AIM prunes visual tokens inside the LLM, so one sequence's layers hold different numbers of tokens: layer 0
the whole merged prompt, a layer past the pruning range only the text. A paged cache that gives every layer
of a sequence the same block table (vLLM's) cannot express that; here each (sequence, layer) owns its own list
of blocks, so a layer holds exactly the tokens that survived to it.

Layout: one slot-major tensor per K and V for all layers, `(num_blocks * BLOCK_SIZE, kv_heads, head_dim)`,
plus one fp32 key bias per slot (proportional attention: log of how many input tokens a key stands for; 0 for
a plain token), and for models with sliding-window layers (Gemma 3) each key's position, which decode's windows
are measured in. A slot is `block * BLOCK_SIZE + offset`. Blocks are all the same size and any free block
serves any (sequence, layer), so freeing never leaves holes that grow with time: the pool's only waste is the
unfilled tail of each (sequence, layer)'s last block (< BLOCK_SIZE tokens).

Reservations: before its prefill a sequence reserves every block it can ever need (its plan fixes the tokens
per layer, `max_new_tokens` bounds the decode), and takes them from its reservation as it fills them. So an
admitted sequence never waits for memory and nothing is preempted; a sequence that does not fit waits (or, if
it could never fit, is refused). Should a sequence ever hold more tokens at a layer than its plan said (an
estimate that fell short), it takes unreserved free blocks, and fails alone if there are none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

BLOCK_SIZE = 16  # tokens per block: small enough that the unfilled tail per (sequence, layer) stays small
BIAS_BYTES = 4  # the fp32 key bias stored per slot
POSITION_BYTES = 4  # the int32 key position stored per slot, where a layer has a sliding window


class KVPoolExhausted(RuntimeError):
    """A sequence needed a block beyond its reservation and the pool had none free."""


@dataclass(frozen=True)
class KVLayout:
    """What one token's K/V at one layer looks like."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    positions: bool = False  # each key's position is kept (sliding-window layers)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token at one layer, plus its key bias (and position)."""
        return 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size() + BIAS_BYTES \
            + (POSITION_BYTES if self.positions else 0)

    @classmethod
    def from_config(cls, text_config, dtype: torch.dtype) -> "KVLayout":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        return cls(text_config.num_hidden_layers, kv_heads, head_dim, dtype)


def blocks_for(tokens_per_layer: list[int], block_size: int = BLOCK_SIZE) -> int:
    """Blocks a sequence holding `tokens_per_layer[l]` tokens at layer l needs."""
    return sum(math.ceil(t / block_size) for t in tokens_per_layer)


class KVPool:
    def __init__(self, layout: KVLayout, budget_bytes: int, device: torch.device | str = "cpu",
                 block_size: int = BLOCK_SIZE):
        self.layout = layout
        self.block_size = block_size
        self.block_bytes = block_size * layout.bytes_per_token
        self.num_blocks = budget_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {self.block_bytes} bytes")
        slots = self.num_blocks * block_size
        # Allocated, not written: memory is committed only as sequences fill it. No read ever sees an unwritten
        # slot (decode's padding points at each sequence's own first key).
        self.keys = torch.empty(slots, layout.kv_heads, layout.head_dim, dtype=layout.dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.key_bias = torch.empty(slots, dtype=torch.float32, device=device)
        self.key_position = torch.empty(slots, dtype=torch.int32, device=device) if layout.positions else None
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack: reuse the warmest block
        self._reserved = 0  # blocks promised to sequences and not yet taken
        # Holders of each block: its sequence, plus every prefix-cache entry and later sequence sharing it (a
        # reused prefix, serving/prefix_cache.py). A block is free again when its last holder lets go.
        self._refs = [0] * self.num_blocks
        # Called with a number of blocks when admission finds too few free: frees what it can (the prefix cache
        # evicts entries nobody else holds).
        self.reclaim: Callable[[int], None] | None = None

    @staticmethod
    def bytes_for(layout: KVLayout, tokens_per_layer: list[int], block_size: int = BLOCK_SIZE) -> int:
        """The budget that holds exactly one sequence of this shape."""
        return blocks_for(tokens_per_layer, block_size) * block_size * layout.bytes_per_token

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def reserved_blocks(self) -> int:
        """Blocks held or promised: what admission has given away."""
        return self.used_blocks + self._reserved

    def blocks_for(self, tokens_per_layer: list[int]) -> int:
        return blocks_for(tokens_per_layer, self.block_size)

    def can_reserve(self, blocks: int) -> bool:
        return blocks <= len(self._free) - self._reserved

    def make_room(self, blocks: int) -> bool:
        """can_reserve, after asking `reclaim` to free blocks if too few are free."""
        if not self.can_reserve(blocks) and self.reclaim is not None:
            self.reclaim(blocks - (len(self._free) - self._reserved))
        return self.can_reserve(blocks)

    def retain(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] += 1

    def drop(self, blocks: list[int]) -> None:
        """Lets go of one hold on each block; a block nobody holds is free."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    # ---- sequences ----------------------------------------------------------------------------
    def reserve(self, tokens_per_layer: list[int]) -> "SequenceKV":
        """A sequence's KV, with every block it may need promised to it. Call `can_reserve` first."""
        blocks = self.blocks_for(tokens_per_layer)
        if not self.can_reserve(blocks):
            raise KVPoolExhausted(f"{blocks} blocks asked, {len(self._free) - self._reserved} available")
        self._reserved += blocks
        return SequenceKV(self, blocks)

    def _take(self, kv: "SequenceKV") -> int:
        if kv.reserved > 0:
            kv.reserved -= 1
            self._reserved -= 1
        elif len(self._free) <= self._reserved:
            raise KVPoolExhausted("a sequence outgrew its KV reservation and no unreserved block is free")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def release(self, kv: "SequenceKV") -> None:
        """The sequence's hold on every block it has (each is free once nobody else holds it), and what is left
        of its reservation."""
        for blocks in kv.blocks:
            self.drop(blocks)
            blocks.clear()
        self._reserved -= kv.reserved
        kv.reserved = 0
        kv.released = True


class SequenceKV:
    """One sequence's K/V: per layer, its own block list and length. Implements the `update` call a Hugging
    Face attention module makes during prefill (the sequence's keys at a layer are exactly what it writes)."""

    def __init__(self, pool: KVPool, reserved: int):
        self.pool = pool
        self.reserved = reserved
        self.blocks: list[list[int]] = [[] for _ in range(pool.layout.num_layers)]
        self.lengths = [0] * pool.layout.num_layers
        self.has_bias = [False] * pool.layout.num_layers
        self.released = False

    def attach_prefix(self, blocks: list[list[int]], tokens: int, has_bias: list[bool]) -> None:
        """Starts this (empty) sequence with a reused prefix: per layer, `blocks` full blocks holding its first
        `tokens` tokens, shared (held, never written: the sequence's own tokens go to blocks after them). The
        reservation made for those tokens goes back to the pool."""
        assert not any(self.lengths) and tokens % self.pool.block_size == 0
        shared = 0
        for layer, layer_blocks in enumerate(blocks):
            self.blocks[layer] = list(layer_blocks)
            self.lengths[layer] = tokens
            self.has_bias[layer] = has_bias[layer]
            self.pool.retain(layer_blocks)
            shared += len(layer_blocks)
        give_back = min(shared, self.reserved)
        self.reserved -= give_back
        self.pool._reserved -= give_back
        self.past = tokens

    def slots(self, layer: int) -> torch.Tensor:
        """The slots of every token the sequence holds at `layer`, in order."""
        bs = self.pool.block_size
        return torch.tensor([self.blocks[layer][i // bs] * bs + i % bs for i in range(self.lengths[layer])],
                            device=self.pool.keys.device)

    def append_slots(self, layer: int, count: int) -> list[int]:
        """Slots for `count` more tokens at `layer`, taking blocks as the last one fills."""
        bs = self.pool.block_size
        blocks, start = self.blocks[layer], self.lengths[layer]
        while len(blocks) * bs < start + count:
            blocks.append(self.pool._take(self))
        self.lengths[layer] = start + count
        return [blocks[i // bs] * bs + i % bs for i in range(start, start + count)]

    def write_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor, key_bias: torch.Tensor | None,
                     key_positions: torch.Tensor | None = None) -> None:
        """key/value (kv_heads, n, head_dim) of the prompt tokens present at `layer`; key_bias (n,) or None;
        key_positions (n,), where the pool keeps positions."""
        slots = torch.tensor(self.append_slots(layer, key.shape[1]), device=key.device)
        pool = self.pool
        pool.keys.index_copy_(0, slots, key.transpose(0, 1).to(pool.keys.dtype))
        pool.values.index_copy_(0, slots, value.transpose(0, 1).to(pool.values.dtype))
        if key_bias is None:
            pool.key_bias.index_fill_(0, slots, 0.0)
        else:
            pool.key_bias.index_copy_(0, slots, key_bias.to(torch.float32))
        self.has_bias[layer] = self.has_bias[layer] or key_bias is not None  # a reused prefix may carry one
        if pool.key_position is not None:
            pool.key_position.index_copy_(0, slots, key_positions.to(torch.int32))

    def prefix_positions(self) -> torch.Tensor:
        """The positions of a reused prefix's tokens (the same at every layer: a prefix is never pruned)."""
        return self.pool.key_position.index_select(0, self.slots(0)[:self.past]).long()

    # Tokens of a reused prefix at the start of every layer: the prefill then runs on the rest of the prompt,
    # whose queries attend to the prefix's keys as well as to their own.
    past: int = 0

    def prompt_writes(self, key_bias: torch.Tensor | None, key_positions: torch.Tensor | None) -> "PromptWrites":
        """The cache a prefill layer is handed: it writes the present prompt tokens' K/V with their key bias and
        positions (where the pool keeps them)."""
        return PromptWrites(self, key_bias, key_positions)

    def read_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """What a prefill layer attends to after writing: its own keys, or a reused prefix's followed by them."""
        if not self.past:
            return key, value
        slots, pool = self.slots(layer), self.pool  # the prefix's keys, then the ones just written
        keys = pool.keys.index_select(0, slots).transpose(0, 1)[None].to(key.dtype)
        values = pool.values.index_select(0, slots).transpose(0, 1)[None].to(value.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def used_bytes(self) -> int:
        """Bytes of K/V and bias the sequence's tokens occupy (not counting unfilled block tails)."""
        return sum(self.lengths) * self.pool.layout.bytes_per_token

    def held_blocks(self) -> int:
        return sum(len(b) for b in self.blocks)


@dataclass
class PromptWrites:
    """The prefill's cache protocol for one layer: a batch of one whose keys are the prompt tokens present (after a
    reused prefix, if any); the bias and positions of those keys are given, not kept on the sequence."""

    kv: SequenceKV
    key_bias: torch.Tensor | None
    key_positions: torch.Tensor | None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.kv.write_prompt(layer_idx, key[0], value[0], self.key_bias, self.key_positions)
        return self.kv.read_prompt(layer_idx, key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.get_seq_length(layer_idx)


def standalone_kv(layout: KVLayout, tokens_per_layer: list[int], device) -> SequenceKV:
    """A sequence's KV in a pool of its own, sized to it (a prefill run outside a served model)."""
    return KVPool(layout, KVPool.bytes_for(layout, tokens_per_layer), device=device).reserve(tokens_per_layer)


class DecodeBatchKV:
    """The cache of one batched decode step: every sequence appends one token at every layer and attends to
    all it holds there. Built on the host from the block tables before the step (lengths and slots are known
    there), moved to the device in one copy per tensor, so no layer syncs the device.

    Per layer l: `write_slots[l]` (B,) where the new token goes; `gather[l]` (B, T_l) the slots of each
    sequence's keys, padded to the longest (T_l); `mask(l)` (B, 1, 1, T_l) additive: the key bias, -inf on
    padding and, at a sliding-window layer (`windows[l]`), on keys at least the window before the new token's
    position (`positions` (B,)); None when none of that applies (the kernel then needs no mask at all).

    Attention reads the keys through a gather into a padded (B, kv_heads, T_l, head_dim) tensor: correct on
    any device with SDPA. A paged kernel (e.g. FlashAttention's block-table decode) would take `tables` and
    `lengths` instead and skip the gather; the block tables are per (sequence, layer) either way."""

    def __init__(self, pool: KVPool, sequences: list[SequenceKV], device: torch.device | str, dtype: torch.dtype,
                 positions: torch.Tensor | None = None, windows: list[int | None] | None = None):
        self.pool = pool
        bs, num_layers = pool.block_size, pool.layout.num_layers
        write, lengths, tables = [], [], []
        for kv in sequences:
            write.append([kv.append_slots(layer, 1)[0] for layer in range(num_layers)])
            lengths.append(kv.lengths)
        max_blocks = max(len(b) for kv in sequences for b in kv.blocks)
        for layer in range(num_layers):
            tables.append([kv.blocks[layer] + [0] * (max_blocks - len(kv.blocks[layer])) for kv in sequences])
        self.write_slots = torch.tensor(write, device=device).T.contiguous()  # (L, B)
        pool.key_bias.index_fill_(0, self.write_slots.flatten(), 0.0)  # a generated token stands for itself
        if pool.key_position is not None:
            if positions is None:
                raise ValueError("a pool that keeps key positions (sliding windows) needs the new tokens' positions")
            pool.key_position.index_copy_(0, self.write_slots.flatten(),
                                          positions.to(device, torch.int32).repeat(num_layers))
        windows = windows or [None] * num_layers
        self.lengths_host = [list(col) for col in zip(*lengths)]  # [layer][sequence]
        lengths_t = torch.tensor(self.lengths_host, device=device)  # (L, B)
        tables_t = torch.tensor(tables, device=device)  # (L, B, max_blocks)
        self.has_bias = [any(kv.has_bias[layer] for kv in sequences) for layer in range(num_layers)]
        self.gather, self._masks = [], []
        for layer in range(num_layers):
            width = max(self.lengths_host[layer])
            pos = torch.arange(width, device=device)
            slots = tables_t[layer].gather(1, (pos // bs).expand(len(sequences), -1)) * bs + pos % bs
            padded = min(self.lengths_host[layer]) < width
            if padded:  # padding reads the sequence's first key (written, finite); the mask hides it
                slots = torch.where(pos[None, :] < lengths_t[layer][:, None], slots, slots[:, :1])
            self.gather.append(slots)
            window = windows[layer]
            if not padded and not self.has_bias[layer] and window is None:
                self._masks.append(None)
                continue
            mask = pool.key_bias.index_select(0, slots.flatten()).view(slots.shape) if self.has_bias[layer] else \
                torch.zeros(slots.shape, device=device)
            if padded:
                mask = mask.masked_fill(pos[None, :] >= lengths_t[layer][:, None], float("-inf"))
            if window is not None:
                keys = pool.key_position.index_select(0, slots.flatten()).view(slots.shape)
                mask = mask.masked_fill(positions.to(device)[:, None] - keys >= window, float("-inf"))
            self._masks.append(mask.to(dtype)[:, None, None, :])

    def mask(self, layer: int) -> torch.Tensor | None:
        return self._masks[layer]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value (B, kv_heads, 1, head_dim): written at each sequence's new slot; returns every key and
        value each sequence holds at this layer, padded: (B, kv_heads, T, head_dim)."""
        pool, slots = self.pool, self.write_slots[layer_idx]
        pool.keys.index_copy_(0, slots, key[:, :, 0].to(pool.keys.dtype))
        pool.values.index_copy_(0, slots, value[:, :, 0].to(pool.values.dtype))
        gather = self.gather[layer_idx]
        shape = (*gather.shape, *pool.keys.shape[1:])  # (B, T, kv_heads, head_dim)
        keys = pool.keys.index_select(0, gather.flatten()).view(shape).transpose(1, 2)
        values = pool.values.index_select(0, gather.flatten()).view(shape).transpose(1, 2)
        return keys.to(key.dtype), values.to(value.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths_host[layer_idx]) - 1
