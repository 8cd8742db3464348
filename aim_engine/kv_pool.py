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
estimate that fell short), it takes unreserved free blocks, and fails alone if there are none (DecodeBatch.step
takes it out of the batch before the step).

Decode runs on a persistent batch (DecodeBatch): its block tables and lengths stay in device tensors across
steps and change by the diff, and attention reads them through a `PagedLayer` handed to the model as the layer's
attention mask, in length groups whose padded size is bounded (the decode workspace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .decode_read import pack, tokens_read

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

    @property
    def available_blocks(self) -> int:
        """Blocks free and not promised: what admission can still reserve without evicting."""
        return len(self._free) - self._reserved

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

    def can_take(self, kv: "SequenceKV", blocks: int) -> bool:
        """Whether `kv` can take `blocks` more: from its reservation, then from blocks nobody has been promised."""
        return blocks <= kv.reserved or blocks - kv.reserved <= len(self._free) - self._reserved

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
        # tokens held per layer; while the sequence decodes in a DecodeBatch, a view of the batch's row
        self.lengths = np.zeros(pool.layout.num_layers, dtype=np.int64)
        self.has_bias = [False] * pool.layout.num_layers
        self.released = False
        self.batch_row: int | None = None  # its row in the DecodeBatch it decodes in

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
        return int(self.lengths.sum()) * self.pool.layout.bytes_per_token

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




DEFAULT_WORKSPACE_BYTES = 256 * 2**20  # padded keys and values one decode attention gather may hold at one layer


class DecodeBatch:
    """The running batch's KV, kept across decode steps (a persistent batch, per (sequence, layer)): block tables
    `tables` (L, rows, width) and `lengths` (L, rows) in device tensors, beside a host copy of the lengths whose
    row is each member's own `lengths` (a view). A sequence joins once after its prefill (its tables written
    once) and leaves when it ends (the last row moves into its place). Each step appends one token per
    (sequence, layer): a block is taken only where a layer's last block is full, found with one test over the
    lengths array, and the step's write slots are computed on the device from the tables. So a step's host work
    does not grow with the tokens held, and is a few array operations in the number of sequences.

    Attention (`PagedLayer`): the tables and lengths of one layer are what a paged decode kernel takes (one page
    table per layer: FlashInfer's paged decode, FlashAttention's block table). Without one, SDPA runs on keys
    gathered from the pool, in groups of rows sorted by length, each at most `workspace_tokens` padded keys (a
    row longer than that alone), so no step allocates more than the workspace beyond what admission reserved.
    `windows[l]`: layer l's sliding window (None: none)."""

    def __init__(self, pool: KVPool, windows: list[int | None], workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        self.pool, self.windows = pool, list(windows)
        self.workspace_bytes = workspace_bytes
        layers, device = pool.layout.num_layers, pool.keys.device
        self.members: list[SequenceKV] = []
        self._lengths = np.zeros((layers, 4), dtype=np.int64)  # host copy; column r: member r's lengths
        self._bias = np.zeros((layers, 4), dtype=bool)  # member r holds biased keys at the layer
        self.tables = torch.zeros((layers, 4, 4), dtype=torch.long, device=device)
        self.lengths = torch.zeros((layers, 4), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.members)

    def kv_attended(self, kvs: list[SequenceKV] | None = None) -> float:
        """The KV tokens a decode step of the members (or of `kvs`, members or not) reads, per layer, padding
        included (decode_read.tokens_read), averaged over the layers: what a step's cost grows with besides the
        batch's size. For the members, array operations over the host lengths (the decode step's host path)."""
        if kvs is not None and not kvs:
            return 0.0
        host = self._lengths[:, :len(self.members)] if kvs is None else np.stack([kv.lengths for kv in kvs], axis=1)
        rows = host.shape[1]
        if not rows:
            return 0.0
        read = rows * host.max(axis=1).astype(np.float64)  # every row padded to the layer's longest
        if rows > 1:
            for layer in np.flatnonzero(read > self.workspace_tokens):  # past the workspace: in length groups
                read[layer] = tokens_read(host[layer].tolist(), self.workspace_tokens)
        return float(read.sum()) / host.shape[0]

    @property
    def workspace_bytes(self) -> int:
        return self.workspace_tokens * self._gathered_bytes

    @workspace_bytes.setter
    def workspace_bytes(self, nbytes: int) -> None:
        """The gather's bound: `nbytes` of keys and values, in the pool's dtype, at one layer."""
        layout = self.pool.layout
        self._gathered_bytes = 2 * layout.kv_heads * layout.head_dim * torch.empty((), dtype=layout.dtype).element_size()
        self.workspace_tokens = max(1, nbytes // self._gathered_bytes)

    def _grow(self, rows: int, width: int) -> None:
        """Room for `rows` members of up to `width` blocks per layer (doubling, so growth is amortised)."""
        layers, cap_rows, cap_width = self.tables.shape
        if rows <= cap_rows and width <= cap_width:
            return
        new_rows, new_width = cap_rows, cap_width
        while new_rows < rows:
            new_rows *= 2
        while new_width < width:
            new_width *= 2
        n = len(self.members)
        tables = torch.zeros((layers, new_rows, new_width), dtype=torch.long, device=self.tables.device)
        tables[:, :n, :cap_width] = self.tables[:, :n]
        lengths = torch.zeros((layers, new_rows), dtype=torch.long, device=self.lengths.device)
        lengths[:, :n] = self.lengths[:, :n]
        host = np.zeros((layers, new_rows), dtype=np.int64)
        host[:, :n] = self._lengths[:, :n]
        bias = np.zeros((layers, new_rows), dtype=bool)
        bias[:, :n] = self._bias[:, :n]
        self.tables, self.lengths, self._lengths, self._bias = tables, lengths, host, bias
        for row, kv in enumerate(self.members):
            kv.lengths = self._lengths[:, row]

    def join(self, kv: SequenceKV) -> None:
        """A prefilled sequence joins: its block tables are written once."""
        row = len(self.members)
        width = max(len(blocks) for blocks in kv.blocks)
        self._grow(row + 1, width + 1)
        table = torch.tensor([blocks + [0] * (width - len(blocks)) for blocks in kv.blocks], dtype=torch.long)
        self.tables[:, row] = 0
        self.tables[:, row, :width] = table.to(self.tables.device)
        self._lengths[:, row] = kv.lengths
        self.lengths[:, row] = torch.from_numpy(self._lengths[:, row]).to(self.lengths.device)
        self._bias[:, row] = kv.has_bias
        kv.lengths, kv.batch_row = self._lengths[:, row], row
        self.members.append(kv)

    def leave(self, kv: SequenceKV) -> None:
        """The sequence leaves (it keeps its lengths); the last member moves into its row."""
        row, last = kv.batch_row, len(self.members) - 1
        if row is None or row > last or self.members[row] is not kv:
            return
        kv.lengths, kv.batch_row = self._lengths[:, row].copy(), None
        if row != last:
            moved = self.members[last]
            self.tables[:, row] = self.tables[:, last]
            self.lengths[:, row] = self.lengths[:, last]
            self._lengths[:, row] = self._lengths[:, last]
            self._bias[:, row] = self._bias[:, last]
            self.members[row], moved.lengths, moved.batch_row = moved, self._lengths[:, row], row
        self.members.pop()

    def outgrown(self) -> list[SequenceKV]:
        """Members that need a block at this step and can take none (they outgrew their reservation and no
        unpromised block is free): the caller takes them out (`leave`) and fails them alone."""
        lengths = self._lengths[:, :len(self.members)]
        need = np.count_nonzero(lengths % self.pool.block_size == 0, axis=0)
        return [self.members[row] for row in np.flatnonzero(need)
                if not self.pool.can_take(self.members[row], int(need[row]))]

    def step(self, positions: torch.Tensor | None, dtype: torch.dtype) -> "DecodeStep":
        """Appends this step's token to every (member, layer): blocks where a layer's last one is full, the slots
        computed on the device. Call `outgrown` first. positions (B,): the new tokens' positions (needed where the
        pool keeps key positions: sliding windows)."""
        pool, bs, count = self.pool, self.pool.block_size, len(self.members)
        host = self._lengths[:, :count]
        layers, rows = np.nonzero(host % bs == 0)  # (layer, row) whose last block is full: ~1 in bs per step
        if layers.size:
            taken = []
            for layer, row in zip(layers.tolist(), rows.tolist()):
                kv = self.members[row]
                kv.blocks[layer].append(pool._take(kv))
                taken.append(kv.blocks[layer][-1])
            cols = host[layers, rows] // bs
            self._grow(count, int(cols.max()) + 1)
            self.tables[torch.from_numpy(layers), torch.from_numpy(rows), torch.from_numpy(cols)] = \
                torch.tensor(taken, dtype=torch.long).to(self.tables.device)
        lengths = self.lengths[:, :count]  # (taken after any growth, which replaces the arrays)
        write = self.tables[:, :count].gather(2, (lengths // bs)[..., None])[..., 0] * bs + lengths % bs  # (L, B)
        lengths += 1
        self._lengths[:, :count] += 1
        flat = write.flatten()
        pool.key_bias.index_fill_(0, flat, 0.0)  # a generated token stands for itself
        if pool.key_position is not None:
            if positions is None:
                raise ValueError("a pool that keeps key positions (sliding windows) needs the new tokens' positions")
            pool.key_position.index_copy_(0, flat, positions.to(flat.device, torch.int32).repeat(pool.layout.num_layers))
        return DecodeStep(self, write, positions, dtype)


class DecodeStep:
    """One decode step's cache: `update` writes each member's new K/V at its slot; the layer's `PagedLayer`
    (`mask(layer)`, handed to the model as the attention mask) attends over what each member holds there."""

    def __init__(self, batch: DecodeBatch, write: torch.Tensor, positions: torch.Tensor | None, dtype: torch.dtype):
        count = len(batch.members)
        host = batch._lengths[:, :count]
        self.batch, self.write, self.dtype, self.count = batch, write, dtype, count
        self.positions = None if positions is None else positions.to(write.device)
        self.widths = host.max(axis=1).tolist()  # per layer: the longest member
        self.padded = (host.min(axis=1) < host.max(axis=1)).tolist()
        self.biased = batch._bias[:, :count].any(axis=1).tolist()
        self.host_lengths = host

    def mask(self, layer: int) -> "PagedLayer":
        return PagedLayer(self, layer)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value (B, kv_heads, 1, head_dim): written at each member's new slot. Attention reads the pool
        through the layer's PagedLayer, so what is returned here is not used."""
        pool, slots = self.batch.pool, self.write[layer_idx]
        pool.keys.index_copy_(0, slots, key[:, :, 0].to(pool.keys.dtype))
        pool.values.index_copy_(0, slots, value[:, :, 0].to(pool.values.dtype))
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.widths[layer_idx] - 1


@dataclass
class PagedLayer:
    """What one layer's decode attention reads: `tables` (B, width) blocks and `lengths` (B,) per member (a
    paged kernel's page table), and the gathered fallback (`groups`, `keys_and_mask`)."""

    step: DecodeStep
    layer: int

    @property
    def tables(self) -> torch.Tensor:
        return self.step.batch.tables[self.layer, :self.step.count]

    @property
    def lengths(self) -> torch.Tensor:
        return self.step.batch.lengths[self.layer, :self.step.count]

    def groups(self) -> list[np.ndarray | None]:
        """Rows attended together: all (None) when their padded keys fit the workspace, else the length groups of
        decode_read.pack."""
        step, limit = self.step, self.step.batch.workspace_tokens
        if step.count * step.widths[self.layer] <= limit or step.count == 1:
            return [None]
        return [np.array(g) for g in pack(step.host_lengths[self.layer].tolist(), limit)]

    def keys_and_mask(self, rows: np.ndarray | None):
        """The rows' keys and values (b, kv_heads, T, head_dim) gathered from the pool, padded to the longest, and
        their additive mask (b, 1, 1, T), or None where nothing is masked: the key bias, padding, and keys at
        least the window before the new token (sliding layers)."""
        step, layer = self.step, self.layer
        pool, bs = step.batch.pool, step.batch.pool.block_size
        index = None if rows is None else torch.from_numpy(rows).to(self.lengths.device)  # once per group
        lengths = self.lengths if rows is None else self.lengths[index]
        host = step.host_lengths[layer] if rows is None else step.host_lengths[layer][rows]
        width, padded = int(host.max()), bool(host.min() < host.max())
        tables = self.tables if rows is None else self.tables[index]
        blocks = tables[:, :(width + bs - 1) // bs]
        offsets = torch.arange(bs, device=blocks.device)
        slots = (blocks[..., None] * bs + offsets).flatten(1)[:, :width]  # (b, T)
        pos = torch.arange(width, device=slots.device)
        if padded:  # padding reads the row's first key (written, finite); the mask hides it
            slots = torch.where(pos[None, :] < lengths[:, None], slots, slots[:, :1])
        shape = (*slots.shape, *pool.keys.shape[1:])  # (b, T, kv_heads, head_dim)
        keys = pool.keys.index_select(0, slots.flatten()).view(shape).transpose(1, 2).to(step.dtype)
        values = pool.values.index_select(0, slots.flatten()).view(shape).transpose(1, 2).to(step.dtype)
        window = step.batch.windows[layer]
        if not padded and not step.biased[layer] and window is None:
            return keys, values, None
        mask = pool.key_bias.index_select(0, slots.flatten()).view(slots.shape) if step.biased[layer] else \
            torch.zeros(slots.shape, device=slots.device)
        if padded:
            mask = mask.masked_fill(pos[None, :] >= lengths[:, None], float("-inf"))
        if window is not None:
            positions = step.positions if rows is None else step.positions[index]
            key_pos = pool.key_position.index_select(0, slots.flatten()).view(slots.shape)
            mask = mask.masked_fill(positions[:, None] - key_pos >= window, float("-inf"))
        return keys, values, mask.to(step.dtype)[:, None, None, :]
