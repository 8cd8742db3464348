"""Importance of visual tokens for progressive pruning (aim-method.md §2).

Each scorer takes the layer's own queries and keys (RoPE already applied, as the attention kernel sees
them) and returns one score per token; only the visual entries are used. They materialise attention
probabilities a block of heads, or of one head's query rows, at a time: at most `budget` elements (and never
less than one query row against its keys), whatever n is; never the whole (H, n, n).

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
# Attention probabilities held at once during scoring, in elements (fp32: 4 bytes each). A block is never smaller
# than one query row against its keys, so a budget under n elements is raised to n.
DEFAULT_SCORE_BUDGET = 32 * 1024 * 1024


def _kv_heads(key: torch.Tensor, num_heads: int, h0: int, h1: int) -> torch.Tensor:
    """The key heads that query heads [h0, h1) read under grouped-query attention (only those are copied)."""
    rep = num_heads // key.shape[0]
    if rep == 1:
        return key[h0:h1]
    return key.index_select(0, torch.arange(h0, h1, device=key.device) // rep)


def _block_shape(num_heads: int, rows: int, n: int, budget: int) -> tuple[int, int]:
    """(heads, query rows) per block of probabilities against n keys: whole heads while all `rows` of one head fit
    in `budget`, otherwise one head and as many rows as fit (at least one)."""
    per_head = rows * n
    if per_head <= budget:
        return max(1, min(num_heads, budget // max(1, per_head))), rows
    return 1, max(1, budget // max(1, n))


def _causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float, row_offset: int | torch.Tensor) -> torch.Tensor:
    """softmax over keys of q k^T * scale with a causal mask. q's rows sit at absolute indices row_offset,
    row_offset + 1, ... (an int) or at the given indices (a tensor, one per row)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if isinstance(row_offset, torch.Tensor):
        rows = row_offset.to(q.device)[:, None]
    else:
        rows = torch.arange(row_offset, row_offset + q.shape[-2], device=q.device)[:, None]
    cols = torch.arange(k.shape[-2], device=q.device)[None, :]
    logits.masked_fill_(cols > rows, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pagerank_scores(
    query: torch.Tensor, key: torch.Tensor, scale: float, budget: int = DEFAULT_SCORE_BUDGET
) -> torch.Tensor:
    """query (H, n, hd), key (H_kv, n, hd) -> (n,) scores. While a head's (n, n) probabilities fit in `budget`,
    whole heads are formed once and stepped in place; past that, each step's pi P is summed over blocks of
    query rows (softmax is per row, so a row block of P is exact), recomputed every step: `budget` elements
    held instead of n^2, for PAGERANK_STEPS times the matmuls."""
    num_heads, n, _ = query.shape
    heads_at_once, rows_at_once = _block_shape(num_heads, n, n, budget)
    sq_sum = torch.zeros(n, dtype=torch.float32, device=query.device)
    for h0 in range(0, num_heads, heads_at_once):
        h1 = min(num_heads, h0 + heads_at_once)
        q, k = query[h0:h1].float(), _kv_heads(key, num_heads, h0, h1).float()
        pi = torch.full((h1 - h0, 1, n), 1.0 / n, dtype=torch.float32, device=query.device)
        if rows_at_once == n:
            probs = _causal_probs(q, k, scale / PAGERANK_TAU, 0)  # (g, n, n)
            for _ in range(PAGERANK_STEPS):
                pi = torch.bmm(pi, probs)
        else:
            for _ in range(PAGERANK_STEPS):
                pi_next = torch.zeros_like(pi)
                for r0 in range(0, n, rows_at_once):
                    r1 = min(n, r0 + rows_at_once)
                    # rows [r0, r1) see keys [0, r1) only
                    probs = _causal_probs(q[:, r0:r1], k[:, :r1], scale / PAGERANK_TAU, r0)  # (1, r, r1)
                    pi_next[..., :r1] += torch.bmm(pi[..., r0:r1], probs)
                pi = pi_next
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
    rows = torch.nonzero(text_rows).flatten()
    total = torch.zeros(n, dtype=torch.float32, device=query.device)
    if rows.numel() == 0:
        return total
    heads_at_once, rows_at_once = _block_shape(num_heads, rows.numel(), n, budget)
    for h0 in range(0, num_heads, heads_at_once):
        h1 = min(num_heads, h0 + heads_at_once)
        k = _kv_heads(key, num_heads, h0, h1).float()
        for r0 in range(0, rows.numel(), rows_at_once):
            chunk = rows[r0 : r0 + rows_at_once]
            total += _causal_probs(query[h0:h1, chunk], k, scale, chunk).sum(dim=(0, 1))  # (g, c, n)
    return total / (num_heads * rows.numel())


def last_token_scores(
    query: torch.Tensor, key: torch.Tensor, scale: float, budget: int = DEFAULT_SCORE_BUDGET
) -> torch.Tensor:
    """Attention of the last query row to every key, averaged over heads. query (H, n, hd) -> (n,)."""
    num_heads, n, _ = query.shape
    heads_at_once, _ = _block_shape(num_heads, 1, n, budget)
    total = torch.zeros(n, dtype=torch.float32, device=query.device)
    for h0 in range(0, num_heads, heads_at_once):
        h1 = min(num_heads, h0 + heads_at_once)
        # the last row sees every key, so the causal mask masks nothing
        total += _causal_probs(query[h0:h1, -1:], _kv_heads(key, num_heads, h0, h1), scale, n - 1).sum(dim=(0, 1))
    return total / num_heads


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
