"""The LLM prefill with progressive pruning, and the batched decode step — a plain loop over the model's own
decoder layers (in the spirit of gpt-fast's `prefill` / `decode_one_token`).

Pruned visual tokens are removed from the hidden states, and so never enter a later layer's KV cache.
Every kept token keeps its original position: cos/sin are computed once for the full sequence and gathered
with the tokens. Causality is by order, which gathering preserves, so prefill runs the fast kernel with
`is_causal`. Under proportional attention (a per-key bias for merged tokens) prefill passes an explicit
additive causal mask instead, and the KV pool stores each key's bias next to it for decode.

K/V live in the paged pool (kv_pool.py), per (sequence, layer). Decode runs one step for a whole
batch of sequences whose layers hold different numbers of tokens (`DecodeBatch`, persistent across steps): each
layer is handed a `PagedLayer` as its attention mask, and the attention function reads the pool through it.

Under a plan's merge_pruned, the pruned visual tokens are first averaged into their most similar kept ones
(`methods/holitom.merge_into_kept`, HoliTom's inner merge), so what they carried stays in the residual stream.

Scores for a pruning decision at layer l come from layer l-1's attention (the last layer that saw the full
current set), from the queries and keys that layer already computed — no extra projections. The prefill
hands the layer a `ScoreCapture` through the attention call's keyword arguments, so the request's queries and
keys reach the scorer explicitly; all attention calls go through SDPA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import Cancelled
from .importance import score_tokens
from .methods.holitom import merge_into_kept
from .plan import ReductionPlan
from .kv_pool import DecodeBatch, DecodeStep, KVLayout, PagedLayer, SequenceKV, standalone_kv

ATTENTION_IMPL = "aim_sdpa"
SCORE_KWARG = "aim_score_capture"  # the attention call's keyword argument that carries a ScoreCapture


def _sdpa_with_score_capture(module, query, key, value, attention_mask, **kwargs):
    if isinstance(attention_mask, PagedLayer):
        return _paged_decode(module, query, attention_mask, **kwargs)
    capture = kwargs.pop(SCORE_KWARG, None)
    if capture is not None:
        capture.capture(query, key, module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _paged_decode(module, query, paged: PagedLayer, **kwargs):
    """Decode attention over the pool: each group of rows (PagedLayer.groups) gathers its keys and runs SDPA; the
    output rows go back in the batch's order. A paged kernel would read `paged.tables` / `paged.lengths` here."""
    outputs, order = [], []
    for rows in paged.groups():
        keys, values, mask = paged.keys_and_mask(rows)
        if rows is None:
            return sdpa_attention_forward(module, query, keys, values, mask, **kwargs)[0], None
        index = torch.from_numpy(rows).to(query.device)
        outputs.append(sdpa_attention_forward(module, query[index], keys, values, mask, **kwargs)[0])
        order.append(index)
    merged = torch.empty((query.shape[0], *outputs[0].shape[1:]), dtype=outputs[0].dtype, device=query.device)
    merged[torch.cat(order)] = torch.cat(outputs)
    return merged, None


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, _sdpa_with_score_capture)
# Same masks as SDPA, so Hugging Face's own forward/generate still work on a model set to this impl.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, sdpa_mask)


@dataclass
class ScoreCapture:
    """Importance scores of one sequence's tokens from the attention of the layer it is handed to."""

    method: str
    is_visual: torch.Tensor
    scores: torch.Tensor | None = None
    seconds: float = 0.0

    def capture(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        start = _synced_clock(query)
        # one sequence: (1, H, n, hd) -> (H, n, hd)
        self.scores = score_tokens(self.method, query[0], key[0], scale, self.is_visual)
        self.seconds = _synced_clock(query) - start


def _synced_clock(tensor: torch.Tensor) -> float:
    """Wall clock after the device has finished queued work (only decision layers pay the sync)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


@dataclass
class LanguageModel:
    """The parts of a Hugging Face causal LM the loop needs. Models that mix attention kinds (Gemma 3) name each
    layer's (`layer_types`, Hugging Face's "full_attention" / "sliding_attention"): a sliding layer attends only to
    keys less than `sliding_window` positions back, and each kind has its own rotary embedding."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def window(self, layer: int) -> int | None:
        """The layer's sliding window in positions, or None (it attends to every earlier key)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def windows(self) -> list[int | None]:
        return [self.window(layer) for layer in range(self.num_layers)]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every attention kind present: {kind: (cos, sin)}; `rope_of(layer)` says which a layer uses."""
        if not self.layer_types:
            return {"": self.rotary_emb(hidden, position_ids)}
        return {kind: self.rotary_emb(hidden, position_ids, kind) for kind in sorted(set(self.layer_types))}

    def rope_of(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else ""

    def kv_layout(self, dtype: torch.dtype) -> KVLayout:
        full = KVLayout.from_config(self.layers[0].self_attn.config, dtype)
        return KVLayout(self.num_layers, full.kv_heads, full.head_dim, dtype,
                        positions=any(w is not None for w in self.windows))


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (vocab,) fp32, for the last prompt position
    cache: SequenceKV
    tokens_per_layer: list[int]
    visual_per_layer: list[int]
    kept_per_layer: list[torch.Tensor] = field(default_factory=list)  # indices into the prompt, if recorded
    scoring_s: float = 0.0  # time spent computing importance scores


def prefill(lm: LanguageModel, embeds: torch.Tensor, position_ids: torch.Tensor, is_visual: torch.Tensor,
            plan: ReductionPlan, decode_capacity: int = 1, record_kept: bool = False,
            key_bias: torch.Tensor | None = None, kv: SequenceKV | None = None,
            should_stop: Callable[[], bool] | None = None, past: int = 0, deepstack: torch.Tensor | None = None,
            blocks: torch.Tensor | None = None) -> PrefillResult:
    """The whole prefill at once (PrefillRun, every layer in one call). embeds (1, n, d); position_ids (1, n) or
    (3, 1, n); is_visual (n,) bool. `kv`: where the sequence's K/V go (without one: a pool of its own for the
    prompt and `decode_capacity` decode steps). The other arguments: PrefillRun's."""
    if kv is None:
        kv = standalone_kv(lm.kv_layout(embeds.dtype), [embeds.shape[1] + decode_capacity] * lm.num_layers,
                           embeds.device)
    run = PrefillRun(lm, embeds, position_ids, is_visual, plan, kv, key_bias=key_bias, past=past,
                     deepstack=deepstack, blocks=blocks, record_kept=record_kept)
    run.advance(lm.num_layers, should_stop)
    return run.result


class PrefillRun:
    """One prompt's prefill, resumable at layer boundaries: `advance(k)` runs the next k layers, and what the
    next layer needs (hidden states, cos/sin, the tokens present, their masks, the scores a pruning decision
    reads) stays here between calls, so a prefill sliced over engine steps computes what one call computes. A
    pruning decision at layer l reads layer l-1's attention of every present token, so no slice splits one.

    key_bias (n,): proportional attention, added to every query's logit for that key (and kept beside the key for
    decode); importance scores are computed without it. past: the first `past` prompt tokens are a reused prefix
    already in `kv` (plans without pruning only); embeds, position_ids and is_visual are the rest, key_bias and
    blocks the whole prompt's. deepstack (levels, v, d): Qwen3-VL's DeepStack, row r for the r-th visual token;
    level l is added to the present visual tokens after layer l, so a pruned token takes its levels with it, as
    masking it would. blocks (n,) int: bidirectional blocks, -1 for none (_Masks says how they and the sliding
    windows are masked)."""

    @torch.inference_mode()
    def __init__(self, lm: LanguageModel, embeds: torch.Tensor, position_ids: torch.Tensor, is_visual: torch.Tensor,
                 plan: ReductionPlan, kv: SequenceKV, key_bias: torch.Tensor | None = None, past: int = 0,
                 deepstack: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
                 record_kept: bool = False):
        if past and plan.prunes:
            raise ValueError("a reused prefix needs a plan without pruning")
        self.lm, self.plan, self.kv, self.past, self.deepstack, self.record_kept = lm, plan, kv, past, deepstack, \
            record_kept
        self.tokens = _Present.of(lm, embeds, position_ids, is_visual,
                                  key_bias[past:] if key_bias is not None else None)
        self.masks = _Masks(lm, kv, position_ids, past, key_bias, blocks)
        self.visual_row = torch.cumsum(is_visual, 0) - 1  # a prompt token's row in `deepstack` (where it is visual)
        self.text = embeds.shape[1] - self.tokens.visual_now
        self.targets = plan.visual_tokens_per_layer(self.tokens.visual_now, lm.num_layers) if plan.prunes else None
        self.result = PrefillResult(logits=None, cache=kv, tokens_per_layer=[], visual_per_layer=[])
        self.layer = 0  # the next layer to run
        self._capture: ScoreCapture | None = None
        self._mask = self.masks.for_present(self.tokens)

    @property
    def done(self) -> bool:
        return self.result.logits is not None

    def tokens_at(self, layer: int) -> int:
        """Prompt tokens the prefill computes at `layer` (after that layer's pruning, if any)."""
        visual = self.tokens.visual_now
        if self.targets is not None and layer >= self.layer:
            visual = min(visual, self.targets[layer])
        return self.text + visual

    @torch.inference_mode()
    def advance(self, layers: int, should_stop: Callable[[], bool] | None = None) -> None:
        """Runs up to `layers` more layers (after the last one, the logits of the last position). `should_stop` is
        polled before every layer (raises Cancelled)."""
        lm, tokens, masks, targets, result = self.lm, self.tokens, self.masks, self.targets, self.result
        stop_at = min(lm.num_layers, self.layer + layers)
        while self.layer < stop_at:
            layer_idx, layer = self.layer, lm.layers[self.layer]
            if should_stop is not None and should_stop():
                raise Cancelled()
            if targets is not None and targets[layer_idx] < tokens.visual_now:
                tokens.prune(_select_kept(self._capture.scores, tokens.visual, targets[layer_idx]),
                             targets[layer_idx], self.plan.merge_pruned)
                self._mask = masks.for_present(tokens)
            result.tokens_per_layer.append(tokens.hidden.shape[1])
            result.visual_per_layer.append(tokens.visual_now)
            if self.record_kept:
                result.kept_per_layer.append(tokens.index.clone())

            next_layer = layer_idx + 1
            self._capture, extra = None, {}
            if targets is not None and next_layer < lm.num_layers and targets[next_layer] < tokens.visual_now:
                self._capture = ScoreCapture(self.plan.importance, tokens.visual)
                extra[SCORE_KWARG] = self._capture
            writes = self.kv.prompt_writes(tokens.key_bias,
                                           masks.positions[tokens.index] if masks.windowed else None)
            hidden = layer(tokens.hidden, attention_mask=self._mask[lm.window(layer_idx)],
                           position_embeddings=tokens.rotary[lm.rope_of(layer_idx)], cache=writes, use_cache=True,
                           **extra)
            tokens.hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if self._capture is not None:
                result.scoring_s += self._capture.seconds
            deepstack = self.deepstack
            if deepstack is not None and layer_idx < deepstack.shape[0]:
                rows = tokens.visual_rows()
                tokens.hidden[0].index_add_(0, rows, deepstack[layer_idx, self.visual_row[tokens.index[rows]]]
                                            .to(tokens.hidden.dtype))
            self.layer += 1
        if self.layer == lm.num_layers and result.logits is None:
            result.logits = lm.lm_head(lm.norm(tokens.hidden[:, -1:]))[0, -1].float()


@dataclass
class _Present:
    """The prompt tokens present at a layer of the prefill: hidden states, cos/sin, prompt index, which are visual,
    and the key bias of each (proportional attention)."""

    hidden: torch.Tensor  # (1, n, d)
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]
    index: torch.Tensor  # (n,) prompt index
    visual: torch.Tensor  # (n,) bool
    key_bias: torch.Tensor | None
    visual_now: int
    _visual_rows: torch.Tensor | None = None  # where the visual tokens are, found once per set (a device sync)

    def visual_rows(self) -> torch.Tensor:
        if self._visual_rows is None:
            self._visual_rows = torch.nonzero(self.visual).flatten()
        return self._visual_rows

    @classmethod
    def of(cls, lm: LanguageModel, embeds, position_ids, is_visual, key_bias) -> "_Present":
        return cls(embeds, lm.rotary(embeds, position_ids), torch.arange(embeds.shape[1], device=embeds.device),
                   is_visual, key_bias, int(is_visual.sum()))

    def prune(self, keep: torch.Tensor, visual_target: int, merge_pruned: bool) -> None:
        """Keeps the tokens at `keep` (ascending); under merge_pruned what is dropped is first averaged into them."""
        merged = merge_into_kept(self.hidden, self.visual, keep, self.key_bias) if merge_pruned else None
        self.hidden = self.hidden.index_select(1, keep)
        self.rotary = {kind: (cos.index_select(-2, keep), sin.index_select(-2, keep))
                       for kind, (cos, sin) in self.rotary.items()}
        self.index, self.visual, self._visual_rows = self.index[keep], self.visual[keep], None
        self.visual_now = visual_target
        if self.key_bias is not None:
            self.key_bias = self.key_bias[keep]
        if merged is not None:
            rows, states, bias = merged
            self.hidden[0, rows] = states
            if bias is not None:
                self.key_bias[rows] = bias


class _Masks:
    """The prefill's attention masks, one per attention kind, for the tokens present: the keys are a reused
    prefix's (`past` of them), then the present tokens'. A bidirectional block (Gemma 3: an image's tokens attend to
    each other both ways) is what survives of it. A sliding-window layer (`lm.window`) sees a key only if its
    position is less than the window before the query's: windows are by position, so pruning never widens one (a
    kept token sees what it saw unpruned, less what was pruned). What they are made of is decided once, on the host:
    whether any block exists, and which windows can bind (pruning only narrows the span of positions), so
    rebuilding them after a pruning step never syncs the device."""

    def __init__(self, lm: LanguageModel, kv: SequenceKV, position_ids: torch.Tensor, past: int,
                 key_bias: torch.Tensor | None, blocks: torch.Tensor | None):
        self.lm, self.past = lm, past
        self.positions = position_ids[0] if position_ids.dim() == 2 else None  # 1-D: the only ones with windows
        self.windowed = kv.pool.layout.positions
        self.past_bias = None if key_bias is None or not past else key_bias[:past]
        self.past_positions = kv.prefix_positions() if past and self.windowed else None
        self.past_blocks, self.blocks = (blocks[:past], blocks[past:]) if blocks is not None else (None, None)
        if blocks is not None and not bool((blocks >= 0).any()):
            self.blocks = self.past_blocks = None
        self.binding = set()
        if self.positions is not None and any(w is not None for w in lm.windows):
            every = self.positions if self.past_positions is None else torch.cat([self.past_positions,
                                                                                  self.positions])
            span = int(every.max() - every.min())
            self.binding = {w for w in lm.windows if w is not None and span >= w}

    @staticmethod
    def _keys(past: torch.Tensor | None, present: torch.Tensor | None) -> torch.Tensor | None:
        return present if past is None or present is None else torch.cat([past, present])

    def for_present(self, tokens: _Present) -> dict[int | None, torch.Tensor | None]:
        index, hidden = tokens.index, tokens.hidden
        bias = self._keys(self.past_bias, tokens.key_bias)
        positions = None if self.positions is None else self._keys(self.past_positions, self.positions[index])
        blocks = None if self.blocks is None else self._keys(self.past_blocks, self.blocks[index])
        return {w: attention_mask(hidden.shape[1], self.past, bias, positions, blocks,
                                  w if w in self.binding else None, hidden.dtype, hidden.device)
                for w in set(self.lm.windows)}


def proportional_key_bias(sizes: torch.Tensor) -> torch.Tensor:
    """The key bias of proportional attention: log of how many input tokens each token stands for."""
    return sizes.float().log()


def attention_mask(n: int, past: int, key_bias: torch.Tensor | None, key_positions: torch.Tensor | None,
                   blocks: torch.Tensor | None, window: int | None, dtype: torch.dtype, device: torch.device
                   ) -> torch.Tensor | None:
    """(1, 1, n, past + n) additive mask of n queries that follow `past` cached keys (the keys: those, then the
    queries' own). Query i sees key j when j is not after it (causal by order), or when both are in the same
    bidirectional block (`blocks` >= 0); under a sliding `window` (None: none that binds), only if the key's position
    is less than `window` before the query's (`key_positions`). A seen key adds its bias (`key_bias`). None where that
    is plain causal attention without bias, which SDPA runs as `is_causal` with no mask at all."""
    if not past and key_bias is None and blocks is None and window is None:
        return None
    c = past + n
    key = torch.arange(c, device=device)
    allowed = key[None, :] <= key[past:, None]
    if blocks is not None:
        allowed |= (blocks[past:, None] == blocks[None, :]) & (blocks[None, :] >= 0)
    if window is not None:
        allowed &= key_positions[None, :] > (key_positions[past:] - window)[:, None]
    bias = torch.zeros(c, device=device) if key_bias is None else key_bias
    return bias.to(dtype)[None, :].expand(n, c).masked_fill(~allowed, float("-inf"))[None, None]


def _select_kept(scores: torch.Tensor, visual: torch.Tensor, target: int) -> torch.Tensor:
    """All text tokens plus the `target` highest-scoring visual tokens, in their original order."""
    vis = torch.nonzero(visual).flatten()
    order = torch.sort(scores[vis].float(), descending=True, stable=True).indices
    chosen = vis[order[:target]]
    text = torch.nonzero(~visual).flatten()
    return torch.sort(torch.cat([text, chosen])).values


@torch.inference_mode()
def decode_batch(lm: LanguageModel, tokens: torch.Tensor, position_ids: torch.Tensor, kv: DecodeStep
                 ) -> torch.Tensor:
    """One decode step for B sequences. tokens (B, 1) int64; position_ids (B, 1) or (3, B, 1).
    Returns (B, vocab) fp32 logits."""
    hidden = lm.embed_tokens(tokens)
    rotary = lm.rotary(hidden, position_ids)
    for layer_idx, layer in enumerate(lm.layers):
        hidden = layer(hidden, attention_mask=kv.mask(layer_idx), position_embeddings=rotary[lm.rope_of(layer_idx)],
                       cache=kv, use_cache=True)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return lm.lm_head(lm.norm(hidden))[:, -1].float()


@torch.inference_mode()
def decode_step(lm: LanguageModel, token: torch.Tensor, position_ids: torch.Tensor, cache: SequenceKV
                ) -> torch.Tensor:
    """One sequence's decode step (a batch of one). token (1, 1); position_ids (1, 1) or (3, 1, 1).
    Returns (vocab,) fp32 logits."""
    batch = DecodeBatch(cache.pool, lm.windows)
    batch.join(cache)
    try:
        step = batch.step(position_ids.reshape(-1)[:1], lm.embed_tokens.weight.dtype)
        return decode_batch(lm, token, position_ids, step)[0]
    finally:
        batch.leave(cache)
