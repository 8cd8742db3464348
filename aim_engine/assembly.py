"""The prompt's assembly, a pure function of the token ids, the encoded media and the plan: each media
placeholder replaced by the item's rows as the plan's reducer left them, with positions, the proportional-attention
key bias, DeepStack rows and bidirectional blocks beside them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters.base import EncodedMedia, FamilyAdapter
from .decoder import proportional_key_bias
from .errors import RequestError
from .merging import MergeResult, merged_rows
from .methods import REDUCERS
from .methods.base import passthrough
from .plan import ReductionPlan


@dataclass
class PreparedPrompt:
    """A request turned into LLM input, before prefill."""

    embeds: torch.Tensor  # (1, n, d)
    position_ids: torch.Tensor  # (1, n) or (3, 1, n)
    is_visual: torch.Tensor  # (n,) bool
    next_position: int  # position id of the first generated token
    key_bias: torch.Tensor | None  # (n,) log of how many input tokens each token stands for; None: plain attention
    text_tokens: int
    visual_in: int
    media: list[EncodedMedia]
    deepstack: torch.Tensor | None = None  # (levels, visual tokens, d): Qwen3-VL's DeepStack rows, merged as they
    blocks: torch.Tensor | None = None  # (n,): the bidirectional block of each token (Gemma 3's images), -1: none


def _starts(counts: list[int]) -> list[tuple[int, int]]:
    """(first row, rows) of consecutive runs of `counts` rows."""
    out, start = [], 0
    for count in counts:
        out.append((start, count))
        start += count
    return out


def _placeholder_slots(adapter: FamilyAdapter, ids: torch.Tensor, media: list[EncodedMedia]):
    """(the placeholders' indices in `ids`, (item, first row, rows) of the span behind each). An item sits behind
    one placeholder, or several with text between them (`adapter.placeholder_spans`)."""
    spans = [(i, start, rows) for i, item in enumerate(media)
             for start, rows in _starts(adapter.placeholder_spans(item))]
    is_placeholder = torch.zeros_like(ids, dtype=torch.bool)
    for pid in adapter.placeholder_ids:
        is_placeholder |= ids == pid
    slots = torch.nonzero(is_placeholder).flatten().tolist()
    if len(slots) != len(spans):
        raise RequestError(
            f"the prompt has {len(slots)} media placeholders for {len(media)} media items taking {len(spans)}; "
            "text must not contain the model's image/video placeholder tokens")
    for slot, (i, _, _) in zip(slots, spans):
        if int(ids[slot]) != adapter.placeholder_id(media[i].kind):
            raise RequestError("media placeholders are out of order with the media items")
    return slots, spans


@dataclass
class _Pieces:
    """The prompt's runs of text and media rows, in order, each with what the assembled prompt keeps of it."""

    embeds: list = field(default_factory=list)
    visual: list = field(default_factory=list)
    full_index: list = field(default_factory=list)  # index of each kept token in the full (unmerged) prompt
    full_ids: list = field(default_factory=list)  # the full prompt's ids (placeholders repeated per row)
    sizes: list = field(default_factory=list)  # input tokens each kept token stands for
    deepstack: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    offset: int = 0  # tokens of the full prompt so far

    def text(self, embeds: torch.Tensor, ids: torch.Tensor) -> None:
        n, device = ids.shape[0], ids.device
        self.embeds.append(embeds)
        self.visual.append(torch.zeros(n, dtype=torch.bool, device=device))
        self.full_index.append(torch.arange(self.offset, self.offset + n, device=device))
        self.full_ids.append(ids)
        self.sizes.append(torch.ones(n, device=device))
        self.blocks.append(torch.full((n,), -1, device=device))
        self.offset += n

    def span(self, res: MergeResult, deep: torch.Tensor | None, row0: int, rows: int, placeholder: torch.Tensor,
             dtype: torch.dtype) -> None:
        inside = (res.keep >= row0) & (res.keep < row0 + rows)
        self.embeds.append(res.features[inside].to(dtype))
        self.visual.append(torch.ones_like(inside)[inside])
        self.full_index.append(self.offset + res.keep[inside] - row0)
        self.full_ids.append(placeholder.repeat(rows))
        self.sizes.append(res.sizes[inside].to(device=placeholder.device, dtype=torch.float32))
        if deep is not None:
            self.deepstack.append(deep[:, inside])
        self.blocks.append(torch.full_like(res.keep[inside], len(self.blocks)))  # a span is a block (where they apply)
        self.offset += rows


def assemble_prompt(adapter: FamilyAdapter, lm, ids: torch.Tensor, media: list[EncodedMedia],
                    plan: ReductionPlan) -> PreparedPrompt:
    """ids (n,) the rendered prompt's tokens, one placeholder per media span; media the encoded items in order."""
    slots, spans = _placeholder_slots(adapter, ids, media)
    device = adapter.device
    ids = ids.to(device)
    text_embeds = lm.embed_tokens(ids[None])[0]
    reduce = REDUCERS[plan.reducer].reduce
    merged = [reduce(m.features, m.groups, plan.merge_target) if plan.merges else passthrough(m.features)
              for m in media]
    deep = [None if m.deepstack is None else merged_rows(res, m.deepstack) for m, res in zip(media, merged)]
    pieces, start = _Pieces(), 0
    for slot, span in zip(slots + [len(ids)], spans + [None]):
        if slot > start:
            pieces.text(text_embeds[start:slot], ids[start:slot])
        if span is None:
            break
        i, row0, rows = span
        pieces.span(merged[i], deep[i], row0, rows, ids[slot], text_embeds.dtype)
        start = slot + 1
    embeds = torch.cat(pieces.embeds)[None]
    is_visual = torch.cat(pieces.visual)
    position_ids, next_position = _positions(adapter, plan, pieces, media, embeds.shape[1])
    key_bias = None
    if plan.proportional_attention and plan.merges:
        sizes = torch.cat(pieces.sizes)
        if bool((sizes > 1).any()):  # all ones: the bias is 0 and the kernel can stay causal
            key_bias = proportional_key_bias(sizes)
    return PreparedPrompt(
        embeds=embeds, position_ids=position_ids, is_visual=is_visual, next_position=next_position,
        key_bias=key_bias,
        text_tokens=int((~is_visual).sum()), visual_in=sum(m.features.shape[0] for m in media), media=media,
        deepstack=torch.cat(pieces.deepstack, dim=1).to(text_embeds.dtype) if pieces.deepstack else None,
        blocks=torch.cat(pieces.blocks) if adapter.bidirectional_media else None,
    )


def _positions(adapter: FamilyAdapter, plan: ReductionPlan, pieces: _Pieces, media: list[EncodedMedia], n: int
               ) -> tuple[torch.Tensor, int]:
    """(position ids of the kept tokens, the first generated token's). M-RoPE: the model's own ids of the full
    prompt, gathered; 1-D: each token's index in the full prompt ("original") or 0..n-1 ("consecutive")."""
    if adapter.uses_mrope:
        full_pos = adapter.mrope_positions(torch.cat(pieces.full_ids)[None], media)
        return full_pos.index_select(-1, torch.cat(pieces.full_index)), int(full_pos.max()) + 1
    if plan.positions == "original":
        return torch.cat(pieces.full_index)[None], pieces.offset
    return torch.arange(n, device=adapter.device)[None], n
