"""ReductionPlan <-> its protobuf message. Light on purpose: the client imports it, so it needs only the plan
type and the stubs, never the engine (torch, transformers). The plan's own constructor validates; this module
only maps names and enum values."""

from __future__ import annotations

import struct

from aim_engine.plan import PlanError, ReductionPlan

from .proto.aim.v1 import aim_service_pb2 as pb

_IMPORTANCE_TO_NAME = {pb.IMPORTANCE_UNSPECIFIED: "pagerank", pb.IMPORTANCE_PAGERANK: "pagerank",
                       pb.IMPORTANCE_TEXT: "text", pb.IMPORTANCE_LAST_TOKEN: "last_token"}
_NAME_TO_IMPORTANCE = {"pagerank": pb.IMPORTANCE_PAGERANK, "text": pb.IMPORTANCE_TEXT,
                       "last_token": pb.IMPORTANCE_LAST_TOKEN}
_REDUCER_TO_NAME = {pb.REDUCER_UNSPECIFIED: "merge", pb.REDUCER_MERGE: "merge", pb.REDUCER_POOL: "pool",
                    pb.REDUCER_EVS: "evs", pb.REDUCER_VIDCOM2: "vidcom2", pb.REDUCER_FASTVID: "fastvid",
                    pb.REDUCER_HOLITOM: "holitom"}
_NAME_TO_REDUCER = {"merge": pb.REDUCER_MERGE, "pool": pb.REDUCER_POOL, "evs": pb.REDUCER_EVS,
                    "vidcom2": pb.REDUCER_VIDCOM2, "fastvid": pb.REDUCER_FASTVID,
                    "holitom": pb.REDUCER_HOLITOM}
_POSITIONS_TO_NAME = {pb.POSITION_RULE_UNSPECIFIED: "consecutive", pb.POSITION_RULE_CONSECUTIVE: "consecutive",
                      pb.POSITION_RULE_ORIGINAL: "original"}
_NAME_TO_POSITIONS = {"consecutive": pb.POSITION_RULE_CONSECUTIVE, "original": pb.POSITION_RULE_ORIGINAL}


def _enum_name(enum, table: dict, value: int, field: str) -> str:
    if value not in table:
        raise PlanError(f"unknown {field} value {value}; use one of {', '.join(enum.keys())}")
    return table[value]


def _sent_float32(value: float) -> float:
    """The shortest decimal that names the same float32 as `value`. merge_retention is a float32 on the wire
    (a double would break the wire contract), so 0.1 arrives as 0.100000001490116...; reading back the shortest
    decimal gives the sender's value whenever it had at most 7 significant digits (9 always name it)."""
    sent = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == sent:
            return candidate
    return value


def plan_from_proto(msg: pb.ReductionPlan) -> ReductionPlan:
    """Raises PlanError naming the bad field: unknown enum values here, everything else in ReductionPlan."""
    if msg.prune_end and not msg.prune_start:
        raise PlanError("prune_end is set but prune_start is 0; set both (prune_start >= 1) or neither")
    return ReductionPlan(
        merge_tokens=msg.merge_tokens or None,
        merge_retention=_sent_float32(msg.merge_retention) if msg.merge_retention else None,
        prune_start=msg.prune_start or None,
        prune_end=msg.prune_end or None,
        importance=_enum_name(pb.Importance, _IMPORTANCE_TO_NAME, msg.importance, "importance"),
        prune_stages=tuple((stage.layer, stage.keep) for stage in msg.prune_stages),
        reducer=_enum_name(pb.Reducer, _REDUCER_TO_NAME, msg.reducer, "reducer"),
        positions=_enum_name(pb.PositionRule, _POSITIONS_TO_NAME, msg.positions, "positions"),
        proportional_attention=msg.proportional_attention,
        merge_pruned=msg.merge_pruned,
    )


def plan_to_proto(plan: ReductionPlan) -> pb.ReductionPlan:
    return pb.ReductionPlan(merge_tokens=plan.merge_tokens or 0, merge_retention=plan.merge_retention or 0.0,
                            prune_start=plan.prune_start or 0, prune_end=plan.prune_end or 0,
                            importance=_NAME_TO_IMPORTANCE[plan.importance],
                            prune_stages=[pb.PruneStage(layer=layer, keep=keep) for layer, keep in plan.prune_stages],
                            reducer=_NAME_TO_REDUCER[plan.reducer],
                            positions=_NAME_TO_POSITIONS[plan.positions],
                            proportional_attention=plan.proportional_attention,
                            merge_pruned=plan.merge_pruned)
