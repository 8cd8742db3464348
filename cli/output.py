"""What the commands print: a response as a few lines a person reads, or as JSON. Imports protobuf and the
stubs only (the client commands must not load torch)."""

from __future__ import annotations

import json


def as_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def print_json(message) -> None:
    print(json.dumps(as_dict(message), ensure_ascii=False))


def plan_line(applied) -> str:
    from service.plan_proto import plan_from_proto
    from service.proto.aim.v1 import aim_service_pb2 as pb

    source = pb.PlanSource.Name(applied.source).removeprefix("PLAN_SOURCE_").lower()
    return f"plan: {plan_from_proto(applied.plan).describe()} ({source}: {applied.reason})"


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:.3g} GFLOPs"


def prefill_line(prefill: float, baseline: float) -> str:
    if prefill >= baseline:
        return f"LLM prefill: {_gflops(prefill)}, nothing saved"
    ratio = f"{baseline / prefill:.1f}x fewer FLOPs, " if prefill else ""
    saved = 100 * (1 - prefill / baseline)
    return f"LLM prefill: {ratio}{saved:.1f}% saved ({_gflops(prefill)} of {_gflops(baseline)})"


def summary_lines(response) -> list[str]:
    """A GenerateResponse as a few lines a person reads: what was reduced, what it saved, where time went."""
    from service.proto.aim.v1 import aim_service_pb2 as pb

    u, c, t = response.usage, response.cost, response.timings
    last = u.visual_tokens_per_layer[-1] if u.visual_tokens_per_layer else u.visual_tokens_merged
    ms = lambda s: f"{1e3 * s:.0f}"  # noqa: E731
    return [
        f"[{pb.FinishReason.Name(response.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
        + plan_line(response.applied_plan),
        f"visual tokens: {u.visual_tokens_in} in -> {u.visual_tokens_merged} after merging -> {last} at the last "
        "layer",
        f"{prefill_line(c.prefill_flops, c.baseline_prefill_flops)}; vision encoder {_gflops(c.vision_flops)} "
        f"(not reduced)",
        f"tokens: prompt {u.prompt_tokens}, answer {u.completion_tokens}; KV cache {c.kv_cache_bytes / 1024:.0f} KiB"
        + (f"; feature cache: {u.feature_cache_hits} of {u.feature_cache_hits + u.feature_cache_misses} media "
           f"reused ({ms(t.vision_seconds_saved)} ms of vision saved)" if u.feature_cache_hits else "")
        + (f"; {u.prefix_tokens_reused} prompt tokens from a cached prefix" if u.prefix_tokens_reused else ""),
        f"time (ms): queue {ms(t.queue_seconds)}, media {ms(t.media_seconds)}, vision {ms(t.vision_seconds)}, "
        f"prefill {ms(t.prefill_seconds)}, first token {ms(t.time_to_first_token_seconds)}, decode "
        f"{ms(t.decode_seconds)}, total {ms(t.total_seconds)}",
    ]


def print_summary(response) -> None:
    print("\n".join(["", *summary_lines(response)]))
