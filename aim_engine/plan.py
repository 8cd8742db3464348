"""ReductionPlan: the per-request knobs of AIM, validated, plus the pruning schedule.

One plan = how much to merge visual tokens before the LLM, and over which layers to prune them inside it.
The empty plan (`ReductionPlan()`) is the untouched model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

IMPORTANCE_METHODS = ("pagerank", "text", "last_token")
# How visual tokens are reduced before the LLM (aim_engine/methods): AIM's similarity merging, or a peer's.
PRE_LLM_METHODS = ("merge", "pool", "evs", "vidcom2", "fastvid", "holitom")
# Where the visual tokens left after the pre-LLM reduction sit on a 1-D RoPE axis: "original" = at the position
# of the input token each one stands for (a merged token: its B partner), so every token of the prompt keeps
# the position it has without reduction; "consecutive" = renumbered 0..n-1 (the paper's rule, aim-method.md §1).
# M-RoPE models always use the former, on their (t, h, w) axes.
POSITION_RULES = ("original", "consecutive")

# Paper defaults (aim-method.md §2): prune from layer l1 until no visual token is left at layer l2.
_PAPER_PRUNE_RANGES = {28: (14, 22), 32: (13, 21)}
# For other depths the defaults are scaled by depth: l1 = 0.5 L, l2 = 0.79 L.
_L1_FRACTION, _L2_FRACTION = 0.5, 0.79
# Paper default merge: 196 -> 49 tokens per frame, i.e. 25% retention.
DEFAULT_MERGE_RETENTION = 0.25
# In a checkpoint directory: the model's own default plan, calibrated on held-out data (aim-serve calibrate),
# which replaces the depth-scaled paper default. {"default_plan": {field: value}, ...provenance}.
PLAN_FILE = "aim-plan.json"


class PlanError(ValueError):
    """A plan value is out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class ReductionPlan:
    """What AIM does to one request.

    merge_tokens: target visual tokens per frame / image crop after merging (absolute), or
    merge_retention: target as a fraction of each frame's tokens, in (0, 1]. At most one of the two.
    prune_start / prune_end: the layer range [l1, l2) of progressive pruning; both or neither.
        Layer l keeps max(0, 1 - (l - l1 + 1) / (l2 - l1)) of the merged visual tokens for l >= l1.
    prune_stages: instead of the progressive range, staged pruning (FastV, PDrop): ((layer, keep), ...) with
        increasing layers and non-increasing keep; from `layer` on, `keep` of the merged visual tokens remain.
    importance: how visual tokens are ranked for pruning: "pagerank" (the paper's attention-graph
        score), "text" (attention the text tokens pay to each visual token) or "last_token" (attention the
        last prompt token pays, as FastV and PDrop rank).
    reducer: how merge_tokens / merge_retention is reached before the LLM, one of PRE_LLM_METHODS: "merge" (AIM's
        similarity merging) or a peer's (aim_engine/methods).
    positions: the position ids of the reduced prompt on 1-D RoPE models, one of POSITION_RULES. Pruning inside
        the LLM always keeps each token's position.
    proportional_attention: every query adds log(size) to its attention logit for a token that stands for
        `size` input tokens, so a merged token draws the attention its members would together (for identical
        members, exactly). Off: the paper's plain attention. Only reducers that merge (merge, fastvid, holitom)
        make sizes other than 1; with the others (and without merging) the flag changes nothing.
    merge_pruned: a visual token pruned inside the LLM is not dropped but averaged into the kept visual token
        most like it (cosine of their hidden states at the pruning layer), as HoliTom's inner-LLM merge does; the
        mean is weighted by the tokens each stands for, and under proportional attention the kept token then
        stands for their total. Without pruning it changes nothing.
    """

    merge_tokens: int | None = None
    merge_retention: float | None = None
    prune_start: int | None = None
    prune_end: int | None = None
    importance: str = "pagerank"
    prune_stages: tuple[tuple[int, float], ...] = ()
    reducer: str = "merge"
    positions: str = "consecutive"
    proportional_attention: bool = False
    merge_pruned: bool = False

    def __post_init__(self) -> None:
        if self.merge_tokens is not None and self.merge_retention is not None:
            raise PlanError("give either merge_tokens or merge_retention, not both")
        if self.merge_tokens is not None and self.merge_tokens < 1:
            raise PlanError(f"merge_tokens must be >= 1 (tokens per frame), got {self.merge_tokens}")
        if self.merge_retention is not None and not (0.0 < self.merge_retention <= 1.0):
            raise PlanError(f"merge_retention must be in (0, 1], got {self.merge_retention}")
        if (self.prune_start is None) != (self.prune_end is None):
            raise PlanError("prune_start and prune_end must be given together")
        if self.prune_start is not None:
            # The decision for layer l uses layer l-1's attention graph, so layer 0 cannot prune.
            if self.prune_start < 1:
                raise PlanError(f"prune_start must be >= 1, got {self.prune_start}")
            if self.prune_end <= self.prune_start:
                raise PlanError(
                    f"prune_end must be greater than prune_start, got {self.prune_start}..{self.prune_end}"
                )
        if self.prune_stages:
            if self.prune_start is not None:
                raise PlanError("give either prune_start/prune_end or prune_stages, not both")
            layers = [layer for layer, _ in self.prune_stages]
            keeps = [keep for _, keep in self.prune_stages]
            if layers[0] < 1 or layers != sorted(set(layers)):
                raise PlanError(f"prune_stages layers must be >= 1 and increasing, got {layers}")
            if any(not 0.0 <= k <= 1.0 for k in keeps) or keeps != sorted(keeps, reverse=True):
                raise PlanError(f"prune_stages keep shares must be in [0, 1] and non-increasing, got {keeps}")
        if self.reducer not in PRE_LLM_METHODS:
            raise PlanError(f"reducer must be one of {PRE_LLM_METHODS}, got {self.reducer!r}")
        if self.positions not in POSITION_RULES:
            raise PlanError(f"positions must be one of {POSITION_RULES}, got {self.positions!r}")
        for flag in ("proportional_attention", "merge_pruned"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.importance not in IMPORTANCE_METHODS:
            raise PlanError(f"importance must be one of {IMPORTANCE_METHODS}, got {self.importance!r}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def default_for_depth(cls, num_layers: int, importance: str = "pagerank") -> "ReductionPlan":
        """The paper's default plan (25% merge, prune l1..l2) for an LLM with `num_layers` layers."""
        l1, l2 = default_prune_range(num_layers)
        return cls(merge_retention=DEFAULT_MERGE_RETENTION, prune_start=l1, prune_end=l2, importance=importance)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def merges(self) -> bool:
        return self.merge_tokens is not None or (
            self.merge_retention is not None and self.merge_retention < 1.0
        )

    @property
    def prunes(self) -> bool:
        return self.prune_start is not None or bool(self.prune_stages)

    @property
    def first_prune_layer(self) -> int | None:
        if self.prune_stages:
            return self.prune_stages[0][0]
        return self.prune_start

    @property
    def is_empty(self) -> bool:
        return not self.merges and not self.prunes

    def check_depth(self, num_layers: int) -> None:
        """Raises PlanError if the prune range does not fit an LLM of `num_layers` layers."""
        if self.prunes and self.first_prune_layer >= num_layers:
            raise PlanError(f"pruning starts at layer {self.first_prune_layer}, beyond the model's {num_layers} "
                            f"layers (0..{num_layers - 1})")

    def merge_target(self, group_size: int) -> int:
        """Tokens a frame/crop of `group_size` tokens keeps after merging."""
        if self.merge_tokens is not None:
            return min(group_size, self.merge_tokens)
        if self.merge_retention is not None:
            return min(group_size, max(1, round(group_size * self.merge_retention)))
        return group_size

    def keep_ratio_at_layer(self, layer: int) -> float:
        """Share of the merged visual tokens present at `layer` (aim-method.md §2)."""
        if self.prune_stages:
            keep = 1.0
            for start, share in self.prune_stages:
                if layer >= start:
                    keep = share
            return keep
        if not self.prunes or layer < self.prune_start:
            return 1.0
        return max(0.0, 1.0 - (layer - self.prune_start + 1) / (self.prune_end - self.prune_start))

    def visual_tokens_per_layer(self, merged_visual: int, num_layers: int) -> list[int]:
        """Visual tokens entering each layer, given the count after merging. Non-increasing (nested)."""
        counts = []
        for layer in range(num_layers):
            counts.append(min(merged_visual, math.floor(merged_visual * self.keep_ratio_at_layer(layer))))
        return counts

    def describe(self) -> str:
        parts = []
        if self.merge_tokens is not None:
            parts.append(f"{self.reducer}→{self.merge_tokens}/frame")
        elif self.merge_retention is not None:
            parts.append(f"{self.reducer}→{self.merge_retention:.3g}")
        if self.prune_stages:
            stages = " ".join(f"L{layer}:{keep:.3g}" for layer, keep in self.prune_stages)
            parts.append(f"prune {stages} ({self.importance})")
        elif self.prunes:
            parts.append(f"prune {self.prune_start}-{self.prune_end} ({self.importance})")
        if self.prunes and self.merge_pruned:
            parts.append("pruned merged into kept")
        if self.merges and self.positions != _DEFAULT_POSITIONS:
            parts.append(f"{self.positions} positions")
        if self.merges and self.proportional_attention:
            parts.append("proportional attention")
        return ", ".join(parts) or "none"


_DEFAULT_POSITIONS = ReductionPlan.__dataclass_fields__["positions"].default


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_prune_stages(text: str) -> tuple[tuple[int, float], ...]:
    """prune_stages from its text form "layer:keep/layer:keep/...", e.g. "2:0.5/4:0.25" (command lines, KServe
    parameters, plan specs). Raises ValueError if an item is not layer:keep; the plan validates the values."""
    stages = []
    for stage in filter(None, (part.strip() for part in text.split("/"))):
        layer, sep, keep = stage.partition(":")
        if not sep:
            raise ValueError(f"prune stage {stage!r} is not layer:keep")
        stages.append((int(layer), float(keep)))
    return tuple(stages)


def format_prune_stages(stages: tuple[tuple[int, float], ...]) -> str:
    """The inverse of parse_prune_stages (repr keeps every float exact)."""
    return "/".join(f"{layer}:{keep!r}" for layer, keep in stages)


@dataclass(frozen=True)
class PlanField:
    """One ReductionPlan field as every input form sees it: the CLI flags, the KServe parameters (`aim_<name>`),
    the HTTP API's JSON, eval's `key=value` and the plan file all read this table. `value_type` is the type a
    typed wire (JSON, KServe) carries; `parse` reads the field's text form. `role` says whether the field sets how
    much is reduced ("amount") or how ("method"). The one rule for a field not given (plan_from_values): it keeps
    the base's value, and a merge or prune field given replaces the base's whole merge or prune group. The base is
    the empty plan on the wires (proto, KServe, HTTP) and in plan files, the model's default plan's rules (its
    "method" fields) on the command line, and the plan an eval spec is written on (`default,...`)."""

    name: str
    value_type: type
    parse: Callable[[str], object]
    help: str
    role: str  # "amount" | "method"
    choices: tuple[str, ...] | None = None


PLAN_FIELDS: tuple[PlanField, ...] = (
    PlanField("merge_tokens", int, int, "visual tokens per frame / image crop after merging (>= 1)", "amount"),
    PlanField("merge_retention", float, float, "share of each frame's visual tokens merging keeps, in (0, 1]",
              "amount"),
    PlanField("prune_start", int, int, "first layer l1 of progressive pruning (>= 1; with prune_end)", "amount"),
    PlanField("prune_end", int, int, "layer l2 by which progressive pruning leaves no visual token (> l1)",
              "amount"),
    PlanField("prune_stages", tuple, parse_prune_stages, "staged pruning instead of l1..l2: layer:keep/..., "
              "e.g. 2:0.5/4:0.25 (layers increasing, keep shares non-increasing)", "amount"),
    PlanField("importance", str, str, f"ranking of visual tokens for pruning: {' | '.join(IMPORTANCE_METHODS)}",
              "method", IMPORTANCE_METHODS),
    PlanField("reducer", str, str, f"how the merge target is reached before the LLM: {' | '.join(PRE_LLM_METHODS)}",
              "method", PRE_LLM_METHODS),
    PlanField("positions", str, str, f"positions of the merged tokens on 1-D RoPE (M-RoPE models keep their own): "
              f"{' | '.join(POSITION_RULES)}", "method", POSITION_RULES),
    PlanField("proportional_attention", bool, _parse_bool, "merged tokens draw attention by their size (bool)",
              "method"),
    PlanField("merge_pruned", bool, _parse_bool, "tokens pruned in the LLM are merged into their most similar kept "
              "token (bool)", "method"),
)
PLAN_FIELD = {f.name: f for f in PLAN_FIELDS}
_MERGE_GROUP = ("merge_tokens", "merge_retention")
_PRUNE_GROUP = ("prune_start", "prune_end", "prune_stages")


def plan_value(name: str, value: object, label: str = "") -> object:
    """A field's value from a typed wire (JSON, KServe parameters): a value of its type (an int also passes as a
    float; prune_stages as [[layer, keep], ...] or its text form). Raises PlanError naming the field as the wire
    does (`label` + name, e.g. "aim_prune_stages")."""
    field = PLAN_FIELD[name]
    try:
        if field.value_type is tuple and isinstance(value, (list, tuple)):
            stages = tuple((int(layer), float(keep)) for layer, keep in value)
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) for stage in value for x in stage):
                raise ValueError(value)
            return stages
        if field.value_type is tuple and isinstance(value, str):
            return field.parse(value.strip())
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{label}{name} {value!r} is not a valid {name}: {exc} ({field.help})") from None
    if field.value_type is bool:
        return value  # ReductionPlan refuses what is not a bool, with its own message
    if field.value_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, field.value_type) or isinstance(value, bool) and field.value_type is not bool:
        raise PlanError(f"{label}{name} must be {field.value_type.__name__}, got {value!r} ({field.help})")
    return value


def plan_from_values(values: dict, base: ReductionPlan | None = None, label: str = "") -> ReductionPlan:
    """The one rule of every input form: the fields given (by name, as plan_value reads them) on top of `base`
    (default: the empty plan); a field not given (or null) keeps the base's value, except that a merge or prune
    field given replaces the base's whole group. Raises PlanError on an unknown field or a bad value."""
    unknown = set(values) - set(PLAN_FIELD)
    if unknown:
        raise PlanError(f"unknown plan field(s) {sorted(label + n for n in unknown)}; known: "
                        f"{sorted(label + n for n in PLAN_FIELD)}")
    given = {name: plan_value(name, value, label) for name, value in values.items() if value is not None}
    base = base or ReductionPlan()
    for group in (_MERGE_GROUP, _PRUNE_GROUP):
        if any(name in given for name in group):
            base = dataclasses.replace(base, **{name: ReductionPlan.__dataclass_fields__[name].default
                                                for name in group})
    return dataclasses.replace(base, **given)


def plan_to_dict(plan: ReductionPlan) -> dict:
    return {k: ([list(stage) for stage in v] if k == "prune_stages" else v)
            for k, v in dataclasses.asdict(plan).items()}


def plan_from_dict(values: dict) -> ReductionPlan:
    """The inverse of plan_to_dict; missing fields take their defaults. Raises PlanError on unknown fields."""
    return plan_from_values(values)


def parse_plan(text: str, base: ReductionPlan | None = None) -> ReductionPlan:
    """A plan from "key=value,..." over ReductionPlan's fields, on top of `base` (default: the empty plan), e.g.
    "merge_retention=0.25,prune_start=15,prune_end=24" or "prune_stages=2:0.5/4:0.2,importance=last_token".
    "none" or "" is the empty plan (or `base`). Raises PlanError naming the bad key or value."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "none":
            continue
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in PLAN_FIELD:
            raise PlanError(f"plan item {item!r} is not key=value over {sorted(PLAN_FIELD)}")
        field = PLAN_FIELD[key.strip()]
        try:
            values[field.name] = field.parse(raw.strip())
        except ValueError:
            raise PlanError(f"plan item {item!r}: {raw.strip()!r} is not a valid {field.name}") from None
    return plan_from_values(values, base)


def default_prune_range(num_layers: int) -> tuple[int, int]:
    """The paper's (l1, l2) for 28- and 32-layer LLMs; scaled by depth otherwise."""
    if num_layers in _PAPER_PRUNE_RANGES:
        return _PAPER_PRUNE_RANGES[num_layers]
    l1 = max(1, round(_L1_FRACTION * num_layers))
    l2 = max(l1 + 1, round(_L2_FRACTION * num_layers))
    return l1, l2
