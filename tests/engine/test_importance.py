"""The importance scorers hold at most their budget of attention probabilities, whatever n is, and score the
same at every budget as the whole (H, n, n) matrix would (formed independently here, by SDPA with V = identity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aim_engine import importance
from aim_engine.importance import PAGERANK_STEPS, PAGERANK_TAU, last_token_scores, pagerank_scores, \
    text_attention_scores

HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5


def whole_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, n, n) causal attention probabilities, every head at once."""
    n = q.shape[1]
    eye = torch.eye(n).expand(q.shape[0], n, n)
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return F.scaled_dot_product_attention(q[None], keys[None], eye[None], is_causal=True, scale=scale)[0]


def whole_pagerank(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    probs = whole_probs(q, k, SCALE / PAGERANK_TAU)
    pi = torch.full((q.shape[0], 1, q.shape[1]), 1.0 / q.shape[1])
    for _ in range(PAGERANK_STEPS):
        pi = torch.bmm(pi, probs)
    return pi.squeeze(1).pow(2).mean(0).sqrt()


def random_qk(heads: int, kv_heads: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, HEAD_DIM, generator=gen), torch.randn(kv_heads, n, HEAD_DIM, generator=gen)


def budgets(heads: int, n: int) -> list[int]:
    """From every head at once, through one head, to blocks of a few rows and of one row (and below that)."""
    return sorted({heads * n * n, n * n, max(1, n * n - 1), 2 * n + 1, n, 1}, reverse=True)


SHAPES = [(4, 2, 1), (4, 2, 2), (6, 1, 7), (3, 3, 33), (4, 2, 64)]  # (heads, KV heads, n)


@pytest.mark.parametrize("heads,kv_heads,n", SHAPES)
def test_pagerank_scores_equal_the_whole_matrix_at_every_budget(heads, kv_heads, n):
    q, k = random_qk(heads, kv_heads, n)
    expected = whole_pagerank(q, k)
    for budget in budgets(heads, n):
        torch.testing.assert_close(pagerank_scores(q, k, SCALE, budget), expected, atol=1e-6, rtol=1e-4,
                                   msg=lambda m: f"budget {budget}: {m}")


@pytest.mark.parametrize("heads,kv_heads,n", SHAPES)
def test_text_and_last_token_scores_equal_the_whole_matrix_at_every_budget(heads, kv_heads, n):
    q, k = random_qk(heads, kv_heads, n, seed=1)
    probs = whole_probs(q, k, SCALE)
    text_rows = torch.arange(n) % 3 != 1
    text_expected = probs[:, text_rows].sum(dim=(0, 1)) / (heads * int(text_rows.sum()))
    for budget in budgets(heads, n):
        torch.testing.assert_close(text_attention_scores(q, k, SCALE, text_rows, budget), text_expected,
                                   atol=1e-6, rtol=1e-4, msg=lambda m: f"text, budget {budget}: {m}")
        torch.testing.assert_close(last_token_scores(q, k, SCALE, budget), probs[:, -1].mean(0),
                                   atol=1e-6, rtol=1e-4, msg=lambda m: f"last_token, budget {budget}: {m}")


@pytest.fixture
def probability_blocks(monkeypatch):
    """The element count of every block of probabilities a scorer forms."""
    sizes: list[int] = []
    formed = importance._causal_probs

    def recording(*args, **kwargs):
        probs = formed(*args, **kwargs)
        sizes.append(probs.numel())
        return probs

    monkeypatch.setattr(importance, "_causal_probs", recording)
    return sizes


@pytest.mark.parametrize("n,budget", [(2000, 50_000), (300, 100)])  # a few rows a block; one row (floor: n)
def test_scorers_hold_at_most_their_budget_whatever_n(probability_blocks, n, budget):
    """Before blocking by rows, pagerank formed a whole head's (n, n) (80 times this budget at n = 2000)."""
    q, k = random_qk(4, 2, n, seed=2)
    text_rows = torch.arange(n) >= n // 2
    expected = (pagerank_scores(q, k, SCALE, n * n), text_attention_scores(q, k, SCALE, text_rows, n * n),
                last_token_scores(q, k, SCALE, n * n))
    probability_blocks.clear()
    got = (pagerank_scores(q, k, SCALE, budget), text_attention_scores(q, k, SCALE, text_rows, budget),
           last_token_scores(q, k, SCALE, budget))
    assert probability_blocks and max(probability_blocks) <= max(budget, n)
    for name, value, reference in zip(("pagerank", "text", "last_token"), got, expected):
        torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
