"""ReductionPlan <-> its protobuf message. Light on purpose: the client imports it, so it needs only the plan
type and the stubs, never the engine (torch, transformers)."""

from __future__ import annotations

from aim_engine.plan import PlanError, ReductionPlan

from .proto.aim.v1 import aim_service_pb2 as pb

_IMPORTANCE_TO_NAME = {pb.IMPORTANCE_UNSPECIFIED: "pagerank", pb.IMPORTANCE_PAGERANK: "pagerank",
                       pb.IMPORTANCE_TEXT: "text"}
_NAME_TO_IMPORTANCE = {"pagerank": pb.IMPORTANCE_PAGERANK, "text": pb.IMPORTANCE_TEXT}
_POSITIONS_TO_NAME = {pb.POSITION_RULE_UNSPECIFIED: "consecutive", pb.POSITION_RULE_CONSECUTIVE: "consecutive",
                      pb.POSITION_RULE_ORIGINAL: "original"}
_NAME_TO_POSITIONS = {"consecutive": pb.POSITION_RULE_CONSECUTIVE, "original": pb.POSITION_RULE_ORIGINAL}

def plan_from_proto(msg: pb.ReductionPlan) -> ReductionPlan:
    if msg.importance not in _IMPORTANCE_TO_NAME:
        raise PlanError(f"unknown importance value {msg.importance}")
    if msg.positions not in _POSITIONS_TO_NAME:
        raise PlanError(f"unknown positions value {msg.positions}")
    if msg.prune_end and not msg.prune_start:
        raise PlanError("prune_end is set but prune_start is 0; set both (prune_start >= 1) or neither")
    return ReductionPlan(
        merge_tokens=msg.merge_tokens or None,
        merge_retention=msg.merge_retention or None,
        prune_start=msg.prune_start or None,
        prune_end=(msg.prune_end or None) if msg.prune_start else None,
        importance=_IMPORTANCE_TO_NAME[msg.importance],
        positions=_POSITIONS_TO_NAME[msg.positions],
        proportional_attention=msg.proportional_attention,
    )


def plan_to_proto(plan: ReductionPlan) -> pb.ReductionPlan:
    return pb.ReductionPlan(merge_tokens=plan.merge_tokens or 0, merge_retention=plan.merge_retention or 0.0,
                            prune_start=plan.prune_start or 0, prune_end=plan.prune_end or 0,
                            importance=_NAME_TO_IMPORTANCE[plan.importance],
                            positions=_NAME_TO_POSITIONS[plan.positions],
                            proportional_attention=plan.proportional_attention)
