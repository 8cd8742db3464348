"""The LLM prefill with progressive pruning, and the decode step — a plain loop over the model's own
decoder layers (in the spirit of gpt-fast's `prefill` / `decode_one_token`).

Pruned visual tokens are removed from the hidden states, and so never enter a later layer's KV cache.
Every kept token keeps its original position: cos/sin are computed once for the full sequence and gathered
with the tokens. Causality is by order, which gathering preserves, so prefill runs the fast kernel with
`is_causal` and decode needs no mask (batch size 1). Under proportional attention (a per-key bias for merged
tokens) prefill passes an explicit additive causal mask instead, and decode a one-row mask of the bias.

Scores for a pruning decision at layer l come from layer l-1's attention (the last layer that saw the full
current set), captured from the queries and keys that layer already computed — no extra projections. The
capture runs only on those layers; all attention calls go through SDPA.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .importance import score_tokens
from .plan import ReductionPlan

ATTENTION_IMPL = "aim_sdpa"


# Score requests of the prefill running on this thread, by attention module: several requests may run on one
# model from different threads, so nothing request-specific is stored on the (shared) modules.
_active = threading.local()


def _sdpa_with_score_capture(module, query, key, value, attention_mask, **kwargs):
    request = getattr(_active, "requests", {}).get(id(module))
    if request is not None:
        request.capture(query, key, module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, _sdpa_with_score_capture)
# Same masks as SDPA, so Hugging Face's own forward/generate still work on a model set to this impl.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPL, sdpa_mask)


@dataclass
class _ScoreRequest:
    method: str
    is_visual: torch.Tensor
    scores: torch.Tensor | None = None
    seconds: float = 0.0

    def capture(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        start = _synced_clock(query)
        # batch size 1: (1, H, n, hd) -> (H, n, hd)
        self.scores = score_tokens(self.method, query[0], key[0], scale, self.is_visual)
        self.seconds = _synced_clock(query) - start


def _synced_clock(tensor: torch.Tensor) -> float:
    """Wall clock after the device has finished queued work (only decision layers pay the sync)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


class LayeredKVCache:
    """Per-layer K/V buffers, preallocated for the prompt plus `extra` decode steps. Layers hold different
    numbers of tokens once pruning has run. Implements the `update` call the attention modules make."""

    def __init__(self, num_layers: int, extra: int):
        self.extra = extra
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        # Proportional attention: per layer, the additive attention bias (log size) of the prompt's keys it
        # holds; keys appended later (generated tokens) stand for one token each, so their bias is 0.
        self.key_bias: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        t = key.shape[-2]
        length = self.lengths[layer_idx]
        buf_k = self.keys[layer_idx]
        if buf_k is None or length + t > buf_k.shape[-2]:
            cap = length + t + self.extra
            new_k = key.new_empty(*key.shape[:-2], cap, key.shape[-1])
            new_v = value.new_empty(*value.shape[:-2], cap, value.shape[-1])
            if buf_k is not None:
                new_k[..., :length, :] = buf_k[..., :length, :]
                new_v[..., :length, :] = self.values[layer_idx][..., :length, :]
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        self.keys[layer_idx][..., length : length + t, :] = key
        self.values[layer_idx][..., length : length + t, :] = value
        self.lengths[layer_idx] = length + t
        end = length + t
        return self.keys[layer_idx][..., :end, :], self.values[layer_idx][..., :end, :]

    def decode_mask(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask of one decode step at `layer_idx` (before its K/V are appended): the prompt keys'
        bias, then 0 for every generated key including the new one. None without proportional attention."""
        bias = self.key_bias[layer_idx]
        if bias is None:
            return None
        extra = self.lengths[layer_idx] + 1 - bias.numel()
        return torch.cat([bias.to(dtype), bias.new_zeros(extra, dtype=dtype)])[None, None, None, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def used_bytes(self) -> int:
        """Bytes of K/V actually held (not the preallocated headroom)."""
        total = 0
        for k, n in zip(self.keys, self.lengths):
            if k is not None:
                total += 2 * n * k.element_size() * k.numel() // k.shape[-2]
        return total


@dataclass
class LanguageModel:
    """The parts of a Hugging Face causal LM the loop needs."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (vocab,) fp32, for the last prompt position
    cache: LayeredKVCache
    tokens_per_layer: list[int]
    visual_per_layer: list[int]
    kept_per_layer: list[torch.Tensor] = field(default_factory=list)  # indices into the prompt, if recorded
    scoring_s: float = 0.0  # time spent computing importance scores


@torch.inference_mode()
def prefill(
    lm: LanguageModel,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    is_visual: torch.Tensor,
    plan: ReductionPlan,
    decode_capacity: int,
    record_kept: bool = False,
    key_bias: torch.Tensor | None = None,
) -> PrefillResult:
    """embeds (1, n, d); position_ids (1, n) or (3, 1, n); is_visual (n,) bool.

    key_bias (n,): proportional attention. Every query adds it to its logit for that key, so a merged token
    that stands for s tokens (bias log s) draws the attention s identical tokens would. Prefill then runs SDPA
    with an explicit (n, n) causal mask instead of `is_causal`, and the cache keeps each layer's bias for the
    decode steps. Importance scores for pruning are computed without it."""
    num_layers = lm.num_layers
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, position_ids)
    index = torch.arange(hidden.shape[1], device=hidden.device)  # prompt index of each present token
    visual = is_visual
    targets = plan.visual_tokens_per_layer(int(is_visual.sum()), num_layers) if plan.prunes else None
    cache = LayeredKVCache(num_layers, decode_capacity)
    result = PrefillResult(logits=None, cache=cache, tokens_per_layer=[], visual_per_layer=[])
    request: _ScoreRequest | None = None
    if not hasattr(_active, "requests"):
        _active.requests = {}
    requests = _active.requests

    mask = None if key_bias is None else _biased_causal_mask(key_bias, hidden.dtype)
    for layer_idx, layer in enumerate(lm.layers):
        if targets is not None and targets[layer_idx] < int(visual.sum()):
            keep = _select_kept(request.scores, visual, targets[layer_idx])
            hidden = hidden.index_select(1, keep)
            cos, sin = cos.index_select(-2, keep), sin.index_select(-2, keep)
            index, visual = index[keep], visual[keep]
            if key_bias is not None:
                key_bias = key_bias[keep]
                mask = _biased_causal_mask(key_bias, hidden.dtype)
        cache.key_bias[layer_idx] = key_bias
        result.tokens_per_layer.append(hidden.shape[1])
        result.visual_per_layer.append(int(visual.sum()))
        if record_kept:
            result.kept_per_layer.append(index.clone())

        next_layer = layer_idx + 1
        request = None
        if targets is not None and next_layer < num_layers and targets[next_layer] < int(visual.sum()):
            request = _ScoreRequest(plan.importance, visual)
            requests[id(layer.self_attn)] = request
        try:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache,
                           use_cache=True)
        finally:
            requests.pop(id(layer.self_attn), None)
        if request is not None:
            result.scoring_s += request.seconds
        if isinstance(hidden, tuple):
            hidden = hidden[0]

    result.logits = lm.lm_head(lm.norm(hidden[:, -1:]))[0, -1].float()
    return result


def proportional_key_bias(sizes: torch.Tensor) -> torch.Tensor:
    """The key bias of proportional attention: log of how many input tokens each token stands for."""
    return sizes.float().log()


def _biased_causal_mask(key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, n, n) additive mask: key j's bias for queries i >= j, -inf above the diagonal."""
    n = key_bias.numel()
    mask = key_bias.to(dtype)[None, :].expand(n, n).clone()
    mask.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=mask.device).triu_(1), float("-inf"))
    return mask[None, None]


def _select_kept(scores: torch.Tensor, visual: torch.Tensor, target: int) -> torch.Tensor:
    """All text tokens plus the `target` highest-scoring visual tokens, in their original order."""
    vis = torch.nonzero(visual).flatten()
    order = torch.sort(scores[vis].float(), descending=True, stable=True).indices
    chosen = vis[order[:target]]
    text = torch.nonzero(~visual).flatten()
    return torch.sort(torch.cat([text, chosen])).values


@torch.inference_mode()
def decode_step(
    lm: LanguageModel, token: torch.Tensor, position_ids: torch.Tensor, cache: LayeredKVCache
) -> torch.Tensor:
    """token (1, 1) int64; position_ids (1, 1) or (3, 1, 1). Returns (vocab,) fp32 logits."""
    hidden = lm.embed_tokens(token)
    cos, sin = lm.rotary_emb(hidden, position_ids)
    for layer_idx, layer in enumerate(lm.layers):
        hidden = layer(hidden, attention_mask=cache.decode_mask(layer_idx, hidden.dtype),
                       position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return lm.lm_head(lm.norm(hidden))[0, -1].float()
