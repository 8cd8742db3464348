"""FLOPs accounting — the one implementation of the paper's formula (aim-method.md §3, LLM-Viewer).

Per decoder layer with n tokens, hidden d, FFN m, heads H of width h_d, attention width a = H h_d, KV width
d_kv = H_kv h_d:
    F(n) = 2n(2 d a + 2 d d_kv + 3 d m) + 4 n^2 a + 5 H n^2 + 17 n d
For the paper's models a = d (h_d = d / H), and this is its formula; models whose config gives a head_dim with
H h_d != d (Gemma 3, some Qwen3) project to and attend over a instead.
Prefill total = sum over layers F(n_l) + d * V   (V = vocabulary: the LM head for one token).

A sliding-window layer (Gemma 3's five of six) attends over at most w keys: c becomes min(c, w) in its attention
terms, in prefill and decode.

Mixture-of-experts layers (Qwen3-VL-MoE) count what a token runs: its k active experts of FFN width m_e and the
router's scores over E experts, so the 6 d m of a dense FFN becomes k 6 d m_e + 2 d E. Which layers are sparse is
the model's own rule (every `decoder_sparse_step`-th, except `mlp_only_layers`). Qwen3's qk-norm (an RMSNorm of each
query and key head, ~4 (a + d_kv) per token) and DeepStack's additions (d per visual token, in three layers) are
elementwise work below the formula's 17 n d and are not counted.

Decoding and the vision encoder are separate figures: AIM does not reduce the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    head_dim: int | None = None  # None: hidden / heads
    # mixture of experts: experts E, active per token k, each expert's FFN width m_e, and the sparse layers
    experts: int = 0
    active_experts: int = 0
    expert_ffn: int = 0
    sparse_layers: frozenset[int] = frozenset()
    # sliding-window attention: the window w, and the layers that use it
    sliding_window: int | None = None
    sliding_layers: frozenset[int] = frozenset()

    def keys_seen(self, layer: int, context: int) -> int:
        """How many of `context` keys a query at `layer` attends to: all, or the window at a sliding layer."""
        if layer in self.sliding_layers and self.sliding_window is not None:
            return min(context, self.sliding_window)
        return context

    def ffn_flops_per_token(self, layer: int) -> float:
        """The FFN of one token at `layer`: 6 d m dense; k 6 d m_e + 2 d E (the router) where the layer is sparse."""
        d = self.hidden
        if layer in self.sparse_layers:
            return self.active_experts * 6 * d * self.expert_ffn + 2 * d * self.experts
        return 6 * d * self.ffn

    @property
    def attention_width(self) -> float:
        return self.hidden if self.head_dim is None else self.heads * self.head_dim

    @property
    def kv_width(self) -> float:
        return self.attention_width * self.kv_heads / self.heads

    @classmethod
    def from_config(cls, text_config) -> "LLMShape":
        layers = text_config.num_hidden_layers
        experts = getattr(text_config, "num_experts", 0) or 0
        sparse = frozenset()
        if experts:
            step = getattr(text_config, "decoder_sparse_step", 1) or 1
            dense = set(getattr(text_config, "mlp_only_layers", None) or [])
            sparse = frozenset(l for l in range(layers) if l not in dense and (l + 1) % step == 0)
        types = getattr(text_config, "layer_types", None) or []
        sliding = frozenset(l for l, kind in enumerate(types) if kind == "sliding_attention")
        return cls(
            hidden=text_config.hidden_size,
            ffn=text_config.intermediate_size,
            heads=text_config.num_attention_heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            vocab=text_config.vocab_size,
            layers=layers,
            head_dim=getattr(text_config, "head_dim", None),
            experts=experts,
            active_experts=getattr(text_config, "num_experts_per_tok", 0) if experts else 0,
            expert_ffn=getattr(text_config, "moe_intermediate_size", 0) if experts else 0,
            sparse_layers=sparse,
            sliding_window=getattr(text_config, "sliding_window", None) if sliding else None,
            sliding_layers=sliding,
        )


def layer_prefill_flops(shape: LLMShape, n: int, past: int = 0, layer: int = 0) -> float:
    """F(n) above for layer `layer` (which matters where some layers are sparse or sliding); with `past` tokens
    already in the layer's cache (a reused prefix) the n queries attend to c = past + n keys (at most the window at
    a sliding layer), and the attention terms are 4 n c a + 5 H n c."""
    d, h, a = shape.hidden, shape.heads, shape.attention_width
    c = shape.keys_seen(layer, past + n)
    return (
        2 * n * (2 * d * a + 2 * d * shape.kv_width)
        + n * shape.ffn_flops_per_token(layer)
        + 4 * n * c * a
        + 5 * h * n * c
        + 17 * n * d
    )


def prefill_flops(shape: LLMShape, tokens_per_layer: Sequence[int], past: int = 0) -> float:
    """LLM prefill FLOPs given the number of tokens entering each layer (`past`: a reused prefix's tokens
    already cached at every layer, attended to and not computed)."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"need {shape.layers} per-layer token counts, got {len(tokens_per_layer)}")
    return sum(layer_prefill_flops(shape, n, past, layer) for layer, n in enumerate(tokens_per_layer)) \
        + shape.hidden * shape.vocab


def decode_step_flops(shape: LLMShape, context_per_layer: Sequence[int]) -> float:
    """One generated token: the same terms as the prefill formula for a single query attending to
    `context_per_layer[l]` cached keys (linear layers 2(2 d a + 2 d d_kv) + the FFN, attention 4 a c + 5 H c,
    elementwise 17 d), plus the LM head."""
    d, h, a = shape.hidden, shape.heads, shape.attention_width
    linear = shape.layers * (2 * (2 * d * a + 2 * d * shape.kv_width) + 17 * d) \
        + sum(shape.ffn_flops_per_token(layer) for layer in range(shape.layers))
    seen = [shape.keys_seen(layer, c) for layer, c in enumerate(context_per_layer)]
    attention = sum(4 * c * a + 5 * h * c for c in seen)
    return linear + attention + shape.hidden * shape.vocab


def vit_flops(hidden: int, ffn: int, layers: int, tokens: int, images: int) -> float:
    """Vision transformer encoder: per layer 2n(4d^2 + 2dm) for the projections and MLP, 4 n^2 d for
    attention; times the number of images/frames encoded. Not reduced by AIM."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * tokens * hidden
    return float(layers * per_layer * images)
