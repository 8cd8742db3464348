"""Turns sequences into tensors and runs the model: one sequence's prefill (vision, merging, the LLM with
pruning, into its KV reservation), and one decode step for a batch, sampled in one batched pass."""

from __future__ import annotations

import time

import torch

from ..adapters.base import FamilyAdapter
from ..assembly import PreparedPrompt
from ..caches import Caches
from ..decoder import LanguageModel, decode_batch, prefill
from ..flops import LLMShape, decode_step_flops, prefill_flops
from ..generation import IncrementalText, sample_tokens, sequence_generator
from ..kv_pool import DecodeBatchKV, KVPool
from ..prepare import Preparer
from ..request import RequestStats
from .sequence import Sequence


class ModelRunner:
    """The model's parts, given explicitly: its adapter (device, dtype, positions, tokenizer), its language model
    and FLOPs shape, the preparer, the KV pool and the caches."""

    def __init__(self, adapter: FamilyAdapter, lm: LanguageModel, shape: LLMShape, preparer: Preparer, pool: KVPool,
                 caches: Caches):
        self.lm, self.shape, self.preparer, self.pool, self.caches = lm, shape, preparer, pool, caches
        self.tokenizer = adapter.tokenizer
        self.device = adapter.device
        self.dtype = adapter.dtype
        self.mrope = adapter.uses_mrope

    def encode(self, batch: list[Sequence]) -> dict[int, list]:
        """The vision tower for the sequences admitted together, in one pass where the family allows: their
        encoded media by sequence id. Each sequence is charged the pass's time in proportion to the frames and
        images it sent (what it reused from the feature cache cost it nothing). If the joint pass fails, nothing
        is returned and each sequence encodes alone (so one bad request fails alone)."""
        if len(batch) < 2:
            return {}
        start = time.perf_counter()
        for seq in batch:
            seq.started = start
        try:
            encoded = self.preparer.encode_batch([s.request.parts for s in batch],
                                                        lambda: all(s.stop_requested() for s in batch))
        except Exception:  # noqa: BLE001 - retried one by one, where the culprit fails alone
            return {}
        for seq, media in zip(batch, encoded):  # each item carries its share of the pass; a hit spent none
            seq.stats.timings.vision_s = sum(m.vision_s for m in media if m.cache != "hit")
        return {s.seq_id: media for s, media in zip(batch, encoded)}

    def prefill(self, seq: Sequence, media: list | None = None) -> int:
        """Vision (unless `media` is given), merging and the LLM prefill of one sequence; returns its first
        token (on the host). Raises Cancelled if it is stopped in the vision tower or between layers."""
        stats = seq.stats
        seq.started = seq.started or time.perf_counter()
        seq.prepared = self.preparer.prepare(seq.request, seq.plan, stats.timings, media=media,
                                               should_stop=seq.stop_requested)
        t_llm = time.perf_counter()
        prepared = seq.prepared
        past, offer = self._reuse_prefix(seq)
        deepstack = prepared.deepstack
        if deepstack is not None and past:  # the reused prefix's visual rows are in its cached K/V already
            deepstack = deepstack[:, int(prepared.is_visual[:past].sum()):]
        pre = prefill(self.lm, prepared.embeds[:, past:], prepared.position_ids[..., past:],
                      prepared.is_visual[past:], seq.plan, key_bias=prepared.key_bias, kv=seq.kv,
                      should_stop=seq.stop_requested, past=past, deepstack=deepstack, blocks=prepared.blocks)
        if offer is not None:
            self.caches.prefixes.offer(offer, seq.kv)
        seq.generator = sequence_generator(seq.sampling, self.device)
        if seq.logits is not None:
            seq.logits.append(pre.logits.cpu())
        token = int(sample_tokens(pre.logits[None], [seq.sampling], [seq.generator])[0])
        seq.first_token = time.perf_counter()
        stats.timings.prefill_s += seq.first_token - t_llm
        stats.timings.ttft_s = seq.first_token - seq.arrival
        _fill_prefill_stats(stats, self.shape, prepared, pre.tokens_per_layer, pre.visual_per_layer, past)
        seq.text = IncrementalText(self.tokenizer, seq.sampling.stop)
        return token

    def _reuse_prefix(self, seq: Sequence):
        """(tokens of a reused prefix now at the start of the sequence's KV, the key to offer after its prefill
        if it reused none); (0, None) where reuse does not apply (no prefix cache, a pruning plan)."""
        cache, prepared = self.caches.prefixes, seq.prepared
        if cache is None or seq.plan.prunes:
            return 0, None
        key = cache.key_for(prepared.embeds, prepared.position_ids, prepared.is_visual, prepared.key_bias,
                            prepared.deepstack, prepared.blocks)
        if key is None:
            return 0, None
        entry = cache.lookup(key)
        if entry is None:
            return 0, key
        return cache.attach(entry, seq.kv), None

    def decode(self, batch: list[Sequence]) -> list[int]:
        """One step for every sequence in `batch`: feeds each its last sampled token, returns the next ones."""
        tokens = torch.tensor([[s.next_token] for s in batch], device=self.device)
        positions = torch.tensor([[s.prepared.next_position + len(s.generated) - 1] for s in batch],
                                 device=self.device)
        kv = DecodeBatchKV(self.pool, [s.kv for s in batch], self.device, self.dtype,
                           positions=positions[:, 0], windows=self.lm.windows)
        if self.mrope:
            positions = positions[None].expand(3, -1, -1)
        logits = decode_batch(self.lm, tokens, positions, kv)
        for row, seq in enumerate(batch):
            if seq.logits is not None:
                seq.logits.append(logits[row].cpu())
            seq.stats.decode_flops += decode_step_flops(self.shape, seq.kv.lengths)
            seq.decode_steps += 1
            seq.batch_size_sum += len(batch)
        sampled = sample_tokens(logits, [s.sampling for s in batch], [s.generator for s in batch])
        return sampled.tolist()  # the step's one device -> host sync


def _fill_prefill_stats(stats: RequestStats, llm: LLMShape, prepared: PreparedPrompt, tokens_per_layer: list[int],
                       visual_per_layer: list[int], past: int = 0) -> None:
    """A finished prefill's counts and FLOPs into the request's stats. `past`: the prompt's first tokens were a
    reused prefix; the prefill computed the rest (`tokens_per_layer`, `visual_per_layer` count only those)."""
    prefix_visual = int(prepared.is_visual[:past].sum())
    stats.prompt_tokens = prepared.embeds.shape[1]
    stats.visual_tokens_in = prepared.visual_in
    stats.visual_tokens_merged = int(prepared.is_visual.sum())
    stats.visual_tokens_per_layer = [prefix_visual + v for v in visual_per_layer]
    stats.prefill_flops_baseline = prefill_flops(llm, [prepared.text_tokens + prepared.visual_in] * llm.layers)
    stats.prefill_flops = prefill_flops(llm, tokens_per_layer, past)
    stats.prefix_tokens_reused = past
    stats.vision_flops = sum(m.vision_flops for m in prepared.media if m.cache != "hit")  # a hit spent none
    stats.feature_cache_hits = sum(m.cache == "hit" for m in prepared.media)
    stats.feature_cache_misses = sum(m.cache == "miss" for m in prepared.media)
    stats.vision_s_saved = sum(m.vision_s for m in prepared.media if m.cache == "hit")
