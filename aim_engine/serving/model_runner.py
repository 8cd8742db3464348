"""Turns sequences into tensors and runs the model: one sequence's prefill (vision, merging, the LLM with
pruning, into its KV reservation), and one decode step for a batch, sampled in one batched pass."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..decoder import decode_batch, prefill
from ..flops import decode_step_flops
from ..generation import IncrementalText, sample_tokens, sequence_generator
from .kv_pool import DecodeBatchKV
from .sequence import Sequence

if TYPE_CHECKING:
    from ..engine import AimEngine


class ModelRunner:
    def __init__(self, engine: "AimEngine"):
        self.engine = engine
        self.lm = engine.lm
        self.device = engine.adapter.device
        self.dtype = engine.adapter.dtype
        self.mrope = engine.adapter.uses_mrope

    def prefill(self, seq: Sequence) -> int:
        """Vision, merging and the LLM prefill of one sequence; returns its first token (on the host).
        Raises PrefillCancelled if it is stopped between layers."""
        engine, stats = self.engine, seq.stats
        seq.started = time.perf_counter()
        seq.prepared = engine.prepare(seq.request, seq.plan, stats.timings)
        t_llm = time.perf_counter()
        prepared = seq.prepared
        pre = prefill(self.lm, prepared.embeds, prepared.position_ids, prepared.is_visual, seq.plan,
                      key_bias=prepared.key_bias, kv=seq.kv, should_stop=seq.stop_requested)
        seq.generator = sequence_generator(seq.sampling, self.device)
        if seq.logits is not None:
            seq.logits.append(pre.logits.cpu())
        token = int(sample_tokens(pre.logits[None], [seq.sampling], [seq.generator])[0])
        seq.first_token = time.perf_counter()
        stats.timings.prefill_s += seq.first_token - t_llm
        stats.timings.ttft_s = seq.first_token - seq.arrival
        engine._fill_prefill_stats(stats, prepared, pre.tokens_per_layer, pre.visual_per_layer)
        seq.text = IncrementalText(engine.tokenizer, seq.sampling.stop)
        return token

    def decode(self, batch: list[Sequence]) -> list[int]:
        """One step for every sequence in `batch`: feeds each its last sampled token, returns the next ones."""
        tokens = torch.tensor([[s.next_token] for s in batch], device=self.device)
        positions = torch.tensor([[s.prepared.next_position + len(s.generated) - 1] for s in batch],
                                 device=self.device)
        if self.mrope:
            positions = positions[None].expand(3, -1, -1)
        kv = DecodeBatchKV(self.engine.pool, [s.kv for s in batch], self.device, self.dtype)
        logits = decode_batch(self.lm, tokens, positions, kv)
        for row, seq in enumerate(batch):
            if seq.logits is not None:
                seq.logits.append(logits[row].cpu())
            seq.stats.decode_flops += decode_step_flops(self.engine.shape, seq.kv.lengths)
            seq.decode_steps += 1
            seq.batch_size_sum += len(batch)
        sampled = sample_tokens(logits, [s.sampling for s in batch], [s.generator for s in batch])
        return sampled.tolist()  # the step's one device -> host sync
