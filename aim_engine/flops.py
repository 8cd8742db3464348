"""FLOPs accounting — the one implementation of the paper's formula (aim-method.md §3, LLM-Viewer).

Per decoder layer with n tokens, hidden d, FFN m, heads H of width h_d, attention width a = H h_d, KV width
d_kv = H_kv h_d:
    F(n) = 2n(2 d a + 2 d d_kv + 3 d m) + 4 n^2 a + 5 H n^2 + 17 n d
For the paper's models a = d (h_d = d / H), and this is its formula; models whose config gives a head_dim with
H h_d != d (Gemma 3, some Qwen3) project to and attend over a instead.
Prefill total = sum over layers F(n_l) + d * V   (V = vocabulary: the LM head for one token).

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

    @property
    def attention_width(self) -> float:
        return self.hidden if self.head_dim is None else self.heads * self.head_dim

    @property
    def kv_width(self) -> float:
        return self.attention_width * self.kv_heads / self.heads

    @classmethod
    def from_config(cls, text_config) -> "LLMShape":
        return cls(
            hidden=text_config.hidden_size,
            ffn=text_config.intermediate_size,
            heads=text_config.num_attention_heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            vocab=text_config.vocab_size,
            layers=text_config.num_hidden_layers,
            head_dim=getattr(text_config, "head_dim", None),
        )


def layer_prefill_flops(shape: LLMShape, n: int, past: int = 0) -> float:
    """F(n) above; with `past` tokens already in the layer's cache (a reused prefix) the n queries attend to
    c = past + n keys, and the attention terms are 4 n c a + 5 H n c."""
    d, m, h, a = shape.hidden, shape.ffn, shape.heads, shape.attention_width
    c = past + n
    return (
        2 * n * (2 * d * a + 2 * d * shape.kv_width + 3 * d * m)
        + 4 * n * c * a
        + 5 * h * n * c
        + 17 * n * d
    )


def prefill_flops(shape: LLMShape, tokens_per_layer: Sequence[int], past: int = 0) -> float:
    """LLM prefill FLOPs given the number of tokens entering each layer (`past`: a reused prefix's tokens
    already cached at every layer, attended to and not computed)."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"need {shape.layers} per-layer token counts, got {len(tokens_per_layer)}")
    return sum(layer_prefill_flops(shape, n, past) for n in tokens_per_layer) + shape.hidden * shape.vocab


def decode_step_flops(shape: LLMShape, context_per_layer: Sequence[int]) -> float:
    """One generated token: the same terms as the prefill formula for a single query attending to
    `context_per_layer[l]` cached keys (linear layers 2(2 d a + 2 d d_kv + 3dm), attention 4 a c + 5 H c,
    elementwise 17 d), plus the LM head."""
    d, m, h, a = shape.hidden, shape.ffn, shape.heads, shape.attention_width
    linear = 2 * (2 * d * a + 2 * d * shape.kv_width + 3 * d * m) + 17 * d
    attention = sum(4 * c * a + 5 * h * c for c in context_per_layer)
    return shape.layers * linear + attention + shape.hidden * shape.vocab


def vit_flops(hidden: int, ffn: int, layers: int, tokens: int, images: int) -> float:
    """Vision transformer encoder: per layer 2n(4d^2 + 2dm) for the projections and MLP, 4 n^2 d for
    attention; times the number of images/frames encoded. Not reduced by AIM."""
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * tokens * hidden
    return float(layers * per_layer * images)
