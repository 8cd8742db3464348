"""Importance of visual tokens for progressive pruning (aim-method.md §2).

Both scorers take the layer's own queries and keys (RoPE already applied, as the attention kernel sees
them) and return one score per token; only the visual entries are used. They materialise attention
probabilities a few heads (or query rows) at a time under a memory budget, never the whole (H, n, n).

- pagerank (the paper's): P_h = causal softmax(Q_h K_h^T * scale / tau), tau = 0.1; pi <- pi P_h for
  5 steps from uniform (PageRank without damping); heads combined by root-mean-square.
- text: mean over heads and over text query rows of the attention they pay to each key.
- last_token (FastV, PDrop): mean over heads of the attention the last prompt token pays to each key; in a
  chat prompt the last token closes the instruction, so this is also PDrop's "last instruction token".
"""

from __future__ import annotations

import torch

PAGERANK_TAU = 0.1
PAGERANK_STEPS = 5
# Attention probabilities held at once during scoring, in elements (fp32: 4 bytes each).
DEFAULT_SCORE_BUDGET = 32 * 1024 * 1024


def _expand_kv(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    rep = num_heads // key.shape[0]
    return key if rep == 1 else key.repeat_interleave(rep, dim=0)


def _causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float, row_offset: int) -> torch.Tensor:
    """softmax over keys of q k^T * scale with a causal mask; q rows start at absolute index row_offset."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    rows = torch.arange(row_offset, row_offset + q.shape[-2], device=q.device)[:, None]
    cols = torch.arange(k.shape[-2], device=q.device)[None, :]
    logits.masked_fill_(cols > rows, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pagerank_scores(
    query: torch.Tensor, key: torch.Tensor, scale: float, budget: int = DEFAULT_SCORE_BUDGET
) -> torch.Tensor:
    """query (H, n, hd), key (H_kv, n, hd) -> (n,) scores."""
    num_heads, n, _ = query.shape
    key = _expand_kv(key, num_heads)
    heads_at_once = max(1, budget // max(1, n * n))
    sq_sum = torch.zeros(n, dtype=torch.float32, device=query.device)
    for h0 in range(0, num_heads, heads_at_once):
        h1 = min(num_heads, h0 + heads_at_once)
        probs = _causal_probs(query[h0:h1], key[h0:h1], scale / PAGERANK_TAU, 0)  # (g, n, n)
        pi = torch.full((h1 - h0, 1, n), 1.0 / n, dtype=torch.float32, device=query.device)
        for _ in range(PAGERANK_STEPS):
            pi = torch.bmm(pi, probs)
        sq_sum += pi.squeeze(1).pow(2).sum(0)
    return (sq_sum / num_heads).sqrt()


def text_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    text_rows: torch.Tensor,
    budget: int = DEFAULT_SCORE_BUDGET,
) -> torch.Tensor:
    """Attention the text tokens (rows where text_rows is True) pay to each key, averaged over heads and
    text rows. query (H, n, hd), key (H_kv, n, hd) -> (n,)."""
    num_heads, n, _ = query.shape
    key = _expand_kv(key, num_heads)
    rows = torch.nonzero(text_rows).flatten()
    total = torch.zeros(n, dtype=torch.float32, device=query.device)
    if rows.numel() == 0:
        return total
    rows_at_once = max(1, budget // max(1, num_heads * n))
    for r0 in range(0, rows.numel(), rows_at_once):
        chunk = rows[r0 : r0 + rows_at_once]
        logits = torch.matmul(query[:, chunk].float(), key.float().transpose(-1, -2)) * scale  # (H, c, n)
        cols = torch.arange(n, device=query.device)[None, :]
        logits.masked_fill_(cols > chunk[:, None], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
    return total / (num_heads * rows.numel())


def last_token_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the last query row to every key, averaged over heads. query (H, n, hd) -> (n,)."""
    key = _expand_kv(key, query.shape[0])
    logits = torch.matmul(query[:, -1:].float(), key.float().transpose(-1, -2)) * scale  # (H, 1, n): sees all
    return torch.softmax(logits, dim=-1).mean(dim=(0, 1))


def score_tokens(
    method: str, query: torch.Tensor, key: torch.Tensor, scale: float, is_visual: torch.Tensor
) -> torch.Tensor:
    """Dispatch by the plan's importance name. query/key carry no batch dimension."""
    if method == "pagerank":
        return pagerank_scores(query, key, scale)
    if method == "text":
        return text_attention_scores(query, key, scale, ~is_visual)
    if method == "last_token":
        return last_token_scores(query, key, scale)
    raise ValueError(f"unknown importance method {method!r}")
