"""Turns sequences into tensors and runs the model: the prefill pieces of a step (vision, merging, layers of the
LLM with pruning, into each sequence's KV reservation; slices.py chooses them), and one decode step for the
persistent batch (kv_pool.DecodeBatch), sampled in one batched pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..adapters.base import FamilyAdapter
from ..assembly import PreparedPrompt
from ..caches import Caches
from ..decoder import LanguageModel, PrefillRun, decode_batch
from ..flops import LLMShape, decode_step_flops, layer_prefill_flops, prefill_flops
from ..generation import IncrementalText, sample_tokens, sequence_generator
from ..kv_pool import DecodeBatch, KVPool
from ..prepare import Preparer
from ..request import RequestStats, VideoPart
from .sequence import Sequence
from .slices import PrefillWork, StageRates, VisionPiece, plan_step


@dataclass(frozen=True)
class DecodeStepStats:
    """One decode step as it ran: the sequences it served, the KV tokens its attention read per layer (padding
    included: DecodeBatch.kv_attended), and its seconds (the model call and sampling, to the step's one device ->
    host sync)."""

    sequences: int
    kv_read: float
    seconds: float


class ModelRunner:
    """The model's parts, given explicitly: its adapter (device, dtype, positions, tokenizer), its language model
    and FLOPs shape, the preparer, the KV pool and the caches."""

    def __init__(self, adapter: FamilyAdapter, lm: LanguageModel, shape: LLMShape, preparer: Preparer, pool: KVPool,
                 caches: Caches):
        self.lm, self.shape, self.preparer, self.pool, self.caches = lm, shape, preparer, pool, caches
        self.batch = DecodeBatch(pool, lm.windows)  # the running batch's KV, across steps
        self.tokenizer = adapter.tokenizer
        self.device = adapter.device
        self.dtype = adapter.dtype
        self.mrope = adapter.uses_mrope

    def work_for(self, seq: Sequence) -> PrefillWork:
        """An admitted sequence's prefill work (its pieces run over steps: `advance`)."""
        request, adapter = seq.request, self.preparer.adapter
        new = seq.sampling.max_new_tokens - 1
        return PrefillWork(request.parts, request.shape, [t - new for t in seq.kv_tokens],
                           images_together=not adapter.images_independent, slice_frames=adapter.video_slice_frames)

    def advance(self, prefilling: list[Sequence], budget_s: float, rates: StageRates, first_only: bool = False
                ) -> list[tuple[Sequence, object]]:
        """Runs this step's prefill pieces (slices.plan_step; `first_only`: up to the first prefill completed) for
        the sequences being prefilled, in admission order: every vision piece in one pass through the tower, then
        each sequence's layers. Returns what ended: (sequence, its first token | Cancelled | the exception it failed
        with); the others continue next step."""
        works = {id(s.work): s for s in prefilling}
        plan = plan_step([s.work for s in prefilling], budget_s, rates, self.lm.num_layers, self._layer_flops,
                         first_only)
        outcomes: dict[int, object] = {}
        self._encode([(works[id(p.work)], p.vision) for p in plan if p.vision], outcomes)
        for pieces in plan:
            seq = works[id(pieces.work)]
            if pieces.layers == 0 or seq.seq_id in outcomes:
                continue
            try:
                token = self._prefill_layers(seq, pieces.layers)
            except Exception as exc:  # noqa: BLE001 - Cancelled, or this request's fault or not: it ends alone
                outcomes[seq.seq_id] = exc
                continue
            if token is not None:
                outcomes[seq.seq_id] = token
        return [(s, outcomes[s.seq_id]) for s in prefilling if s.seq_id in outcomes]

    def _layer_flops(self, work: PrefillWork, layer: int) -> float:
        past = work.run.past if work.run is not None else 0
        return layer_prefill_flops(self.shape, work.layer_cost_tokens(layer), past, layer)

    def _encode(self, chosen: list[tuple[Sequence, list[VisionPiece]]], outcomes: dict[int, object]) -> None:
        """The chosen vision pieces of several sequences in one pass where the family allows. Each sequence is
        charged the pass's time in proportion to its frames and images (a cache hit costs it nothing). If the
        joint pass fails, each sequence's pieces run alone, so one bad request fails alone."""
        if not chosen:
            return
        start = time.perf_counter()
        for seq, _ in chosen:
            seq.started = seq.started or start
        try:
            passes = [(chosen, self._encode_pass(chosen))]
        except Exception as exc:  # noqa: BLE001 - retried one by one, where the culprit fails alone
            if len(chosen) == 1:
                outcomes[chosen[0][0].seq_id] = exc
                return
            passes = []
            for one in chosen:
                try:
                    passes.append(([one], self._encode_pass([one])))
                except Exception as exc:  # noqa: BLE001
                    outcomes[one[0].seq_id] = exc
        for group, encoded in passes:  # stored only once computed, so a retried pass never stores twice
            for (seq, pieces), media in zip(group, encoded):
                try:
                    self._store(seq, pieces, media)
                except Exception as exc:  # noqa: BLE001 - e.g. joining its slices: it fails alone
                    outcomes[seq.seq_id] = exc

    def _encode_pass(self, chosen: list[tuple[Sequence, list[VisionPiece]]]) -> list[list]:
        """One pass through the tower for the chosen pieces: per sequence, its pieces' encodings in order."""
        requests = []
        for seq, pieces in chosen:
            parts = []
            for piece in pieces:
                if piece.frames is None:
                    parts += [seq.work.items[i] for i in piece.items]
                else:
                    video = seq.work.items[piece.items[0]]
                    parts.append(VideoPart(frames=video.frames[piece.frames[0]:piece.frames[1]], fps=video.fps))
            requests.append(parts)
        return self.preparer.encode_batch(requests, lambda: all(s.stop_requested() for s, _ in chosen))

    def _store(self, seq: Sequence, pieces: list[VisionPiece], media: list) -> None:
        """A sequence's encoded pieces into its work: whole items, or a video's slices (joined once complete)."""
        work, media = seq.work, iter(media)
        for piece in pieces:
            if piece.frames is None:
                for item in piece.items:
                    work.encoded[item] = next(media)
                continue
            item = piece.items[0]
            work.slices.setdefault(item, []).append(next(media))
            work.next_frame[item] = piece.frames[1]
            if piece.frames[1] == len(work.items[item].frames):
                work.encoded[item] = self.preparer.join_slices(work.items[item], work.slices.pop(item))
        done = [m for m in work.encoded if m is not None]
        seq.stats.timings.vision_s = sum(m.vision_s for m in done if m.cache != "hit") + sum(
            m.vision_s for parts in work.slices.values() for m in parts)
        if work.vision_done:
            seq.media_encoded()

    def _prefill_layers(self, seq: Sequence, layers: int) -> int | None:
        """`layers` more layers of the sequence's LLM prefill (assembling its prompt and finding a reusable
        prefix first); its first token once the last layer has run (on the host), else None. Raises Cancelled
        if it is stopped between layers."""
        work, stats = seq.work, seq.stats
        start = time.perf_counter()
        if work.run is None:
            seq.started = seq.started or start
            seq.prepared = self.preparer.prepare(seq.request, seq.plan, stats.timings, media=work.encoded,
                                                 should_stop=seq.stop_requested)
            prepared = seq.prepared
            past, work.offer = self._reuse_prefix(seq)
            deepstack = prepared.deepstack
            if deepstack is not None and past:  # the reused prefix's visual rows are in its cached K/V already
                deepstack = deepstack[:, int(prepared.is_visual[:past].sum()):]
            work.run = PrefillRun(self.lm, prepared.embeds[:, past:], prepared.position_ids[..., past:],
                                  prepared.is_visual[past:], seq.plan, seq.kv, key_bias=prepared.key_bias,
                                  past=past, deepstack=deepstack, blocks=prepared.blocks)
            start = time.perf_counter()
        run = work.run
        run.advance(layers, seq.stop_requested)
        stats.timings.prefill_s += time.perf_counter() - start
        if not run.done:
            return None
        return self._first_token(seq)

    def _first_token(self, seq: Sequence) -> int:
        """A finished prefill: its prefix offered to the cache, its first token sampled, its stats filled."""
        work, stats, pre = seq.work, seq.stats, seq.work.run.result
        t0 = time.perf_counter()
        if work.offer is not None:
            self.caches.prefixes.offer(work.offer, seq.kv)
        seq.generator = sequence_generator(seq.sampling, self.device)
        if seq.logits is not None:
            seq.logits.append(pre.logits.cpu())
        token = int(sample_tokens(pre.logits[None], [seq.sampling], [seq.generator])[0])
        seq.first_token = time.perf_counter()
        stats.timings.prefill_s += seq.first_token - t0
        stats.timings.ttft_s = seq.first_token - seq.arrival
        _fill_prefill_stats(stats, self.shape, seq.prepared, pre.tokens_per_layer, pre.visual_per_layer,
                            work.run.past)
        seq.text = IncrementalText(self.tokenizer, seq.sampling.stop)
        seq.work = None
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

    # ---- decode ---------------------------------------------------------------------------------------------
    def retire(self, seq: Sequence) -> None:
        """The sequence leaves the decode batch (it finished, failed or was cancelled)."""
        if seq.kv is not None:
            self.batch.leave(seq.kv)

    def decode(self, batch: list[Sequence]
               ) -> tuple[list[tuple[Sequence, int]], list[Sequence], DecodeStepStats | None]:
        """One step for every sequence in `batch` (those not in the decode batch yet join it): feeds each its last
        sampled token. Returns (sequence, next token) in the batch's order, the sequences that outgrew their KV
        reservation with no block left to take (out of the batch; the caller fails them alone), and the step's
        stats (None: no step ran)."""
        start = time.perf_counter()
        for seq in batch:
            if seq.kv.batch_row is None:
                self.batch.join(seq.kv)
        owner = {id(s.kv): s for s in batch}
        outgrown = [owner[id(kv)] for kv in self.batch.outgrown()]
        for seq in outgrown:
            self.batch.leave(seq.kv)
        seqs = [owner[id(kv)] for kv in self.batch.members]
        if not seqs:
            return [], outgrown, None
        tokens = torch.tensor([[s.next_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.prepared.next_position + len(s.generated) - 1] for s in seqs],
                                 device=self.device)
        step = self.batch.step(positions[:, 0], self.dtype)
        if self.mrope:
            positions = positions[None].expand(3, -1, -1)
        logits = decode_batch(self.lm, tokens, positions, step)
        attended = self.batch.kv_attended()  # seqs are its members
        for row, seq in enumerate(seqs):
            if seq.logits is not None:
                seq.logits.append(logits[row].cpu())
            seq.stats.decode_flops += decode_step_flops(self.shape, seq.kv.lengths)
            seq.decode_steps += 1
            seq.batch_size_sum += len(seqs)
            seq.kv_attended_sum += attended
        sampled = sample_tokens(logits, [s.sampling for s in seqs], [s.generator for s in seqs]).tolist()
        elapsed = time.perf_counter() - start  # after the step's one device -> host sync
        for seq in seqs:
            seq.stats.timings.decode_steps_s += elapsed
        return list(zip(seqs, sampled)), outgrown, DecodeStepStats(len(seqs), attended, elapsed)


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
    if past:  # reuse applies to plans without pruning: every layer computed the same tokens after the prefix
        stats.prefill_flops_reused = prefill_flops(llm, [past + t for t in tokens_per_layer]) - stats.prefill_flops
    stats.prefix_tokens_reused = past
    stats.vision_flops = sum(m.vision_flops for m in prepared.media if m.cache != "hit")  # a hit spent none
    stats.feature_cache_hits = sum(m.cache == "hit" for m in prepared.media)
    stats.feature_cache_misses = sum(m.cache == "miss" for m in prepared.media)
    stats.vision_s_saved = sum(m.vision_s for m in prepared.media if m.cache == "hit")
