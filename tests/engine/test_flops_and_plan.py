import pytest

from aim_engine.flops import LLMShape, decode_step_flops, layer_prefill_flops, prefill_flops
from aim_engine.plan import PlanError, ReductionPlan, default_prune_range, parse_plan, plan_from_dict

QWEN2_7B = LLMShape(hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064, layers=28)
FRAMES, TEXT = 32, 100  # the paper's video setting


def tflops(plan: ReductionPlan, per_frame: int = 196) -> float:
    merged = FRAMES * plan.merge_target(per_frame)
    visual = plan.visual_tokens_per_layer(merged, QWEN2_7B.layers)
    return prefill_flops(QWEN2_7B, [TEXT + v for v in visual]) / 1e12


def test_spec_check_values_qwen2_7b_32_frames():
    assert tflops(ReductionPlan()) == pytest.approx(99.63, abs=0.005)
    assert tflops(ReductionPlan(merge_tokens=49)) == pytest.approx(22.90, abs=0.005)
    assert tflops(ReductionPlan.default_for_depth(28)) == pytest.approx(14.76, abs=0.005)


def test_an_explicit_head_dim_changes_only_the_attention_width():
    """Gemma-3-4B's shape: 8 heads of 256 attend over 2048 of its 2560 hidden width. Counted by hand: q and o
    project d -> a -> d, k and v d -> 4 x 256, the scores and the weighted sum are n x c x a each."""
    gemma = LLMShape(hidden=2560, ffn=10240, heads=8, kv_heads=4, vocab=262208, layers=34, head_dim=256)
    n, past, d, a, kv = 100, 20, 2560, 2048, 1024
    by_hand = 2 * n * (d * a + a * d) + 2 * n * 2 * d * kv + 2 * n * 3 * d * 10240 \
        + 2 * 2 * n * (past + n) * a + 5 * 8 * n * (past + n) + 17 * n * d
    assert layer_prefill_flops(gemma, n, past) == by_hand
    # a head_dim that is hidden / heads is the paper's formula exactly
    same = LLMShape(hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064, layers=28, head_dim=128)
    assert prefill_flops(same, [900] * 28) == prefill_flops(QWEN2_7B, [900] * 28)
    assert decode_step_flops(same, [900] * 28) == decode_step_flops(QWEN2_7B, [900] * 28)


def test_moe_layers_count_the_active_experts_and_the_router():
    """Qwen3-VL-30B-A3B's text model: 8 of 128 experts of width 768 per token, in every layer by default; the
    model's own rule picks the sparse layers when it spaces them."""
    from transformers import Qwen3VLMoeTextConfig

    config = Qwen3VLMoeTextConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                  num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                                  moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936)
    shape = LLMShape.from_config(config)
    assert shape.sparse_layers == frozenset(range(48))
    n, d, a, kv = 100, 2048, 4096, 512
    by_hand = 2 * n * (d * a + a * d) + 2 * n * 2 * d * kv + n * (8 * 6 * d * 768 + 2 * d * 128) \
        + 2 * 2 * n * n * a + 5 * 32 * n * n + 17 * n * d
    assert layer_prefill_flops(shape, n, layer=5) == by_hand
    config.decoder_sparse_step, config.mlp_only_layers = 2, [1]
    spaced = LLMShape.from_config(config)
    assert spaced.sparse_layers == frozenset(range(3, 48, 2))
    dense = by_hand - n * (8 * 6 * d * 768 + 2 * d * 128) + n * 6 * d * 6144
    assert layer_prefill_flops(spaced, n, layer=1) == dense and layer_prefill_flops(spaced, n, layer=3) == by_hand
    # decoding runs the same FFN per layer as a one-token prefill
    assert decode_step_flops(spaced, [1] * 48) == pytest.approx(
        sum(layer_prefill_flops(spaced, 1, layer=l) for l in range(48)) + d * 151936)


def test_decode_step_matches_the_prefill_terms_for_one_token():
    # one token with an empty cache: the prefill formula for n=1 minus its n^2 terms plus c=1 attention
    one = decode_step_flops(QWEN2_7B, [1] * 28)
    assert one == pytest.approx(28 * layer_prefill_flops(QWEN2_7B, 1) + 3584 * 152064)


def test_schedule_matches_paper_formula():
    plan = ReductionPlan(prune_start=14, prune_end=22)
    assert [plan.keep_ratio_at_layer(l) for l in (0, 13)] == [1.0, 1.0]
    assert plan.keep_ratio_at_layer(14) == pytest.approx(0.875)
    assert plan.keep_ratio_at_layer(21) == 0.0 and plan.keep_ratio_at_layer(27) == 0.0
    counts = plan.visual_tokens_per_layer(1568, 28)
    assert counts[:15] == [1568] * 14 + [1372] and counts[20] == 196 and counts[21:] == [0] * 7


def test_default_ranges():
    assert default_prune_range(28) == (14, 22)
    assert default_prune_range(32) == (13, 21)
    assert default_prune_range(24) == (12, 19)  # scaled: 0.5 L, 0.79 L
    plan = ReductionPlan.default_for_depth(24)
    assert plan.merge_retention == 0.25 and (plan.prune_start, plan.prune_end) == (12, 19)


def test_empty_plan():
    plan = ReductionPlan()
    assert plan.is_empty and plan.merge_target(196) == 196
    assert plan.visual_tokens_per_layer(50, 4) == [50] * 4
    assert ReductionPlan(merge_retention=1.0).is_empty


@pytest.mark.parametrize("kwargs,message", [
    (dict(merge_tokens=0), "merge_tokens must be >= 1"),
    (dict(merge_retention=0.0), "merge_retention must be in"),
    (dict(merge_retention=1.5), "merge_retention must be in"),
    (dict(merge_tokens=4, merge_retention=0.5), "not both"),
    (dict(prune_start=3), "together"),
    (dict(prune_start=0, prune_end=4), "prune_start must be >= 1"),
    (dict(prune_start=5, prune_end=5), "greater than"),
    (dict(importance="random"), "importance must be one of"),
    (dict(positions="shifted"), "positions must be one of"),
])
def test_invalid_plans_have_clear_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        ReductionPlan(**kwargs)


def test_prune_range_must_fit_the_model():
    with pytest.raises(PlanError, match="beyond the model's 4 layers"):
        ReductionPlan(prune_start=4, prune_end=6).check_depth(4)
    ReductionPlan(prune_start=3, prune_end=9).check_depth(4)  # l2 past the end: prunes until the last layer


def test_plans_parse_from_text_with_clear_errors():
    assert parse_plan("") == parse_plan("none") == ReductionPlan()
    assert parse_plan("merge_retention=0.25, prune_start=15,prune_end=24,importance=text") == ReductionPlan(
        merge_retention=0.25, prune_start=15, prune_end=24, importance="text")
    assert parse_plan("prune_stages=2:0.5/4:0.2,importance=last_token").prune_stages == ((2, 0.5), (4, 0.2))
    base = ReductionPlan(merge_retention=0.25, prune_start=15, prune_end=24)
    # a field group given replaces the base's whole group (merge_tokens vs retention, range vs stages)
    assert parse_plan("merge_tokens=16", base) == ReductionPlan(merge_tokens=16, prune_start=15, prune_end=24)
    assert parse_plan("prune_stages=2:0.1", base) == ReductionPlan(merge_retention=0.25, prune_stages=((2, 0.1),))
    assert parse_plan("positions=original", base) == ReductionPlan(
        merge_retention=0.25, prune_start=15, prune_end=24, positions="original")
    assert parse_plan("proportional_attention=true", base) == parse_plan("proportional_attention=1", base) == \
        ReductionPlan(merge_retention=0.25, prune_start=15, prune_end=24, proportional_attention=True)
    assert not parse_plan("proportional_attention=off").proportional_attention
    with pytest.raises(PlanError, match="proportional_attention must be true or false"):
        plan_from_dict({"proportional_attention": "false"})
    for text, message in [("merge_ratio=2", "not key=value over"), ("merge_tokens", "not key=value"),
                          ("merge_tokens=many", "not a valid merge_tokens"), ("prune_start=3", "together"),
                          ("prune_stages=2:0.5/4", "not a valid prune_stages"),
                          ("positions=shifted", "positions must be one of"),
                          ("proportional_attention=maybe", "not a valid proportional_attention")]:
        with pytest.raises(PlanError, match=message):
            parse_plan(text)
