"""Which sequences run: a FIFO of waiting sequences, the running batch, and admission by KV memory.

Policy, each step:
1. sequences cancelled or past their deadline leave (waiting or running) and free their KV at once;
2. waiting sequences are admitted in arrival order while the batch has room (`max_batch`), the pool can
   reserve their whole KV need, and this step's admitted prompt tokens last (`prefill_tokens_per_step`, at least
   one sequence per step, so a long prompt is never starved). The head of the queue is never overtaken: a large
   request that waits for memory is not starved by small ones behind it;
3. the sequences being prefilled advance by this step's pieces (slices.py: within the step budget, in admission
   order), then every running sequence whose prefill is done takes one decode step together.

A sequence whose KV need exceeds the whole pool can never run: `add` refuses it at once.
"""

from __future__ import annotations

import threading
from collections import deque

from ..kv_pool import KVPool
from .sequence import FINISHED, RUNNING, WAITING, Sequence


class KVBudgetError(Exception):
    """A request needs more KV memory than the whole pool holds."""


class Scheduler:
    def __init__(self, pool: KVPool, max_batch: int, prefill_tokens_per_step: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.pool = pool
        self.max_batch = max_batch
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._inbox: deque[Sequence] = deque()  # added from other threads; moved to `waiting` by the stepping one
        self._inbox_lock = threading.Lock()

    def add(self, seq: Sequence) -> None:
        """Thread-safe and non-blocking. Raises KVBudgetError if the sequence could never fit."""
        need = self.pool.blocks_for(seq.kv_tokens)
        if need > self.pool.num_blocks:
            raise KVBudgetError(
                f"the request needs {need * self.pool.block_bytes / 2**20:.1f} MiB of KV cache "
                f"({sum(seq.kv_tokens)} token-layers); the whole pool holds "
                f"{self.pool.capacity_bytes / 2**20:.1f} MiB: ask for fewer new tokens, fewer frames or more "
                "reduction")
        with self._inbox_lock:
            self._inbox.append(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox)

    def inbox(self) -> list[Sequence]:
        """Sequences added and not yet moved to `waiting` (they wait behind it)."""
        with self._inbox_lock:
            return list(self._inbox)

    def take_inbox(self) -> None:
        with self._inbox_lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()

    def stopped(self) -> list[Sequence]:
        """Waiting and running sequences whose caller went away or whose deadline passed."""
        return [s for s in list(self.waiting) + self.running if s.stop_requested()]

    def admit(self) -> list[Sequence]:
        """Moves sequences from waiting to running, reserving their KV; returns them (to be prefilled)."""
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if admitted and tokens + seq.prompt_tokens > self.prefill_tokens_per_step:
                break
            if not self.pool.make_room(self.pool.blocks_for(seq.kv_tokens)):  # evicts reused prefixes if needed
                break
            self.waiting.popleft()
            seq.kv = self.pool.reserve(seq.kv_tokens)
            seq.status = RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.prompt_tokens
        return admitted

    def finish(self, seq: Sequence) -> None:
        """The sequence leaves (from waiting or running) and its KV goes back to the pool."""
        if seq.status == WAITING:
            self.waiting.remove(seq)
        elif seq.status == RUNNING:
            self.running.remove(seq)
        if seq.kv is not None and not seq.kv.released:
            self.pool.release(seq.kv)
        seq.status = FINISHED
