"""Every plan the engine accepts survives every front end: the protobuf message, the KServe request parameters,
the Python client and the command line carry all of ReductionPlan's fields and give back the same plan; what the
engine refuses is refused with its own message."""

from __future__ import annotations

import dataclasses
import itertools
import re
from types import SimpleNamespace

import pytest

from aim_engine.plan import IMPORTANCE_METHODS, POSITION_RULES, PRE_LLM_METHODS, PlanError, ReductionPlan
from cli.client import request_kwargs as _request_kwargs
from cli.flags import plan_from_flags
from cli.main import build_parser
from service.client import AimClient
from service.convert import request_from_proto
from service.kserve import PARAMETERS, PLAN_PARAMETERS, InferenceServicer, plan_from_parameters, plan_to_parameters
from service.plan_proto import plan_from_proto, plan_to_proto
from service.proto.aim.v1 import aim_service_pb2 as pb
from service.proto.inference import grpc_service_pb2 as kpb
from service.types import ServiceError
from tests.service.conftest import BASE

PLAN_FIELDS = {f.name for f in dataclasses.fields(ReductionPlan)}
MERGES = [{}, dict(merge_tokens=3), dict(merge_retention=0.1), dict(merge_retention=0.333), dict(merge_retention=1.0)]
PRUNES = [{}, dict(prune_start=2, prune_end=5), dict(prune_stages=((1, 0.5),)),
          dict(prune_stages=((2, 0.5), (4, 0.35 ** 3), (6, 0.0)))]


def all_plans():
    """The product of every merge and prune shape with every importance, reducer, position rule and attention
    rule: a new value in the engine's tuples is drawn here without touching the test."""
    for merge, prune, importance, reducer, positions, proportional, merge_pruned in itertools.product(
            MERGES, PRUNES, IMPORTANCE_METHODS, PRE_LLM_METHODS, POSITION_RULES, (False, True), (False, True)):
        yield ReductionPlan(**merge, **prune, importance=importance, reducer=reducer, positions=positions,
                            proportional_attention=proportional, merge_pruned=merge_pruned)


PLANS = list(all_plans())


def test_every_plan_field_has_a_place_on_every_wire():
    assert {f.name for f in pb.ReductionPlan.DESCRIPTOR.fields} == PLAN_FIELDS
    assert set(PLAN_PARAMETERS.values()) == PLAN_FIELDS and set(PLAN_PARAMETERS) <= set(PARAMETERS)
    flags = vars(build_parser().parse_args(["generate"]))
    assert {f for f in PLAN_FIELDS if f not in ("prune_start", "prune_end")} | {"prune"} <= set(flags)


def test_every_plan_describes_itself_naming_its_reducer():
    """The description is what a response's summary, KServe's aim_plan and the evaluation's table show."""
    for plan in PLANS:
        text = plan.describe()
        given = plan.merge_tokens is not None or plan.merge_retention is not None
        assert text and (given is (f"{plan.reducer}→" in text)), (plan, text)


def test_every_plan_round_trips_through_the_proto():
    assert len(PLANS) == len(MERGES) * len(PRUNES) * len(IMPORTANCE_METHODS) * len(PRE_LLM_METHODS) * 2 * 2 * 2
    for plan in PLANS:
        msg = plan_to_proto(plan)
        assert plan_from_proto(pb.ReductionPlan.FromString(msg.SerializeToString())) == plan, plan


def test_every_plan_round_trips_through_the_client_and_the_servers_decoding():
    for plan in PLANS[::7]:
        request = AimClient.build_request("Hi", plan=plan)
        _, reduction = request_from_proto(pb.GenerateRequest.FromString(request.SerializeToString()), 4, 8)
        assert reduction.kind == "plan" and reduction.plan == plan, plan


def _infer_request(params: dict) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    for name, value in params.items():  # the parameter kinds tritonclient sends for Python values
        kind = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


KSERVE = InferenceServicer(SimpleNamespace(settings=BASE))


def test_every_plan_round_trips_through_kserve_parameters():
    for plan in PLANS:
        params = plan_to_parameters(plan)
        assert plan_from_parameters(params) == plan, plan
    for plan in PLANS[::7]:  # and through a whole request's decoding, parameter types checked
        _, reduction = KSERVE.parse_request(_infer_request(plan_to_parameters(plan)))
        assert reduction.kind == "plan" and reduction.plan == plan, plan


def test_a_float32_merge_retention_reads_back_as_sent():
    """merge_retention is a float32 on the wire: 0.1 must not come back as 0.100000001490116."""
    assert plan_from_proto(pb.ReductionPlan(merge_retention=0.1)).merge_retention == 0.1
    assert plan_from_proto(pb.ReductionPlan(merge_retention=0.1933)).merge_retention == 0.1933


ENGINE_REFUSES = [
    (dict(prune_start=2, prune_end=5, prune_stages=[pb.PruneStage(layer=3, keep=0.5)]), "not both"),
    (dict(prune_stages=[pb.PruneStage(layer=4, keep=0.5), pb.PruneStage(layer=2, keep=0.25)]), "increasing"),
    (dict(prune_stages=[pb.PruneStage(layer=2, keep=0.25), pb.PruneStage(layer=4, keep=0.5)]), "non-increasing"),
    (dict(prune_stages=[pb.PruneStage(layer=0, keep=0.5)]), "layers must be >= 1"),
    (dict(prune_stages=[pb.PruneStage(layer=2, keep=1.5)]), "in [0, 1]"),
    (dict(reducer=9), "unknown reducer value 9; use one of REDUCER_UNSPECIFIED"),
    (dict(importance=9), "unknown importance value 9"),
]


@pytest.mark.parametrize("fields,message", ENGINE_REFUSES)
def test_plans_the_engine_refuses_are_refused_with_its_message(fields, message):
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_from_proto(pb.ReductionPlan(**fields))


@pytest.mark.parametrize("params,message", [
    (dict(aim_prune_stages="2:0.5/4"), "not layer:keep"),
    (dict(aim_prune_stages="2:half"), "aim_prune_stages '2:half'"),
    (dict(aim_prune_stages="4:0.5/2:0.25"), "increasing"),
    (dict(aim_prune_stages="2:0.5", aim_prune_start=2, aim_prune_end=4), "not both"),
    (dict(aim_reducer="zip"), "reducer must be one of"),
    (dict(aim_importance="random"), "importance must be one of"),
])
def test_kserve_plan_parameters_the_engine_refuses_are_invalid_arguments(params, message):
    with pytest.raises(ServiceError, match=message) as err:
        KSERVE.parse_request(_infer_request({"aim_reduction": "plan", **params}))
    assert err.value.status == "invalid_argument"


@pytest.mark.parametrize("value,expected", [(pb.PRIORITY_UNSPECIFIED, "normal"), (pb.PRIORITY_LOW, "low"),
                                            (pb.PRIORITY_NORMAL, "normal"), (pb.PRIORITY_HIGH, "high")])
def test_priority_reaches_the_reduction_choice(value, expected):
    msg = pb.GenerateRequest(parts=[pb.ContentPart(text="Hi")],
                             reduction=pb.Reduction(auto=pb.AutoBudget(priority=value)))
    assert request_from_proto(msg, 4, 8)[1].priority == expected
    client_side = AimClient.build_request("Hi", priority=None if expected == "normal" else expected)
    assert request_from_proto(client_side, 4, 8)[1].priority == expected
    assert KSERVE.parse_request(_infer_request({"aim_priority": expected}))[1].priority == expected


def test_unknown_priorities_are_invalid_arguments():
    msg = pb.GenerateRequest(parts=[pb.ContentPart(text="Hi")], reduction=pb.Reduction(auto=pb.AutoBudget(priority=7)))
    with pytest.raises(ServiceError, match="unknown auto.priority value 7; use one of PRIORITY_UNSPECIFIED"):
        request_from_proto(msg, 4, 8)
    with pytest.raises(ServiceError, match="aim_priority must be one of low, normal, high"):
        KSERVE.parse_request(_infer_request({"aim_priority": "urgent"}))
    with pytest.raises(ValueError, match="priority must be"):
        AimClient.build_request("Hi", priority="urgent")


MODEL_DEFAULT = ReductionPlan(merge_retention=0.16, importance="text", reducer="pool", positions="original",
                              proportional_attention=True)


@pytest.mark.parametrize("argv,expected", [
    (["--prune-stages", "2:0.5/4:0.25", "--importance", "last_token"],
     ReductionPlan(prune_stages=((2, 0.5), (4, 0.25)), importance="last_token", reducer="pool",
                   positions="original", proportional_attention=True)),
    (["--merge-retention", "0.5", "--reducer", "merge", "--no-proportional-attention"],
     ReductionPlan(merge_retention=0.5, importance="text", reducer="merge", positions="original")),
    (["--merge-tokens", "4", "--reducer", "evs", "--prune", "2", "5", "--importance", "pagerank", "--positions",
      "consecutive", "--proportional-attention", "--merge-pruned"],
     ReductionPlan(merge_tokens=4, reducer="evs", prune_start=2, prune_end=5, importance="pagerank",
                   positions="consecutive", proportional_attention=True, merge_pruned=True)),
])
def test_the_command_lines_give_every_plan_field_and_the_rest_from_the_models_default(argv, expected):
    """Both command lines (the client's and `ask`) read a plan with one helper: the flags say how much to reduce,
    and the rules they leave out are the model's default plan's, not ReductionPlan's."""
    for command in (["generate", "--priority", "low"], ["ask", "--model", "m", "--prompt", "p"]):
        args = build_parser().parse_args([*command, *argv])
        assert plan_from_flags(args, lambda: MODEL_DEFAULT) == expected


def test_an_explicit_client_plan_asks_the_server_for_the_models_rules_only_when_needed():
    asked = []
    client = SimpleNamespace(model_info=lambda model: asked.append(model) or SimpleNamespace(
        default_plan=plan_to_proto(MODEL_DEFAULT)))
    args = build_parser().parse_args(["generate", "--model", "m1", "--merge-tokens", "3"])
    assert _request_kwargs(args, client)["plan"] == dataclasses.replace(MODEL_DEFAULT, merge_retention=None,
                                                                        merge_tokens=3)
    assert asked == ["m1"]
    every_rule = ["--importance", "text", "--reducer", "merge", "--positions", "original",
                  "--no-proportional-attention", "--no-merge-pruned"]
    args = build_parser().parse_args(["generate", "--merge-tokens", "3", *every_rule])
    assert _request_kwargs(args, client)["plan"] == ReductionPlan(merge_tokens=3, importance="text",
                                                                  positions="original")
    assert asked == ["m1"]  # every rule given: no round trip
    auto = _request_kwargs(build_parser().parse_args(["generate", "--slo-ms", "500", "--priority", "high"]), client)
    assert auto["plan"] is None and not auto["no_reduction"] and auto["slo_ms"] == 500


@pytest.mark.parametrize("argv,message", [
    (["--importance", "text"], "--importance only say how to reduce: add --merge-tokens"),
    (["--none", "--merge-tokens", "2", "--positions", "original", "--importance", "text", "--reducer", "merge",
      "--proportional-attention", "--no-merge-pruned"], "give one of --none, --aim-default or an explicit plan's flags"),
    (["--none", "--slo-ms", "100"], "--slo-ms only apply to auto requests"),
])
def test_contradictory_reduction_flags_are_refused_before_anything_is_sent(argv, message):
    with pytest.raises(PlanError, match=message):
        _request_kwargs(build_parser().parse_args(["generate", *argv]), client=None)


def test_a_malformed_prune_stages_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prune-stages", "2:x"])
    assert "argument --prune-stages: '2:x' is not LAYER:KEEP/" in capsys.readouterr().err


def test_one_plan_in_every_input_form_is_the_same_plan():
    """The command line, the proto, the KServe parameters, the HTTP API's JSON and eval's key=value text (all read
    through the one field table, aim_engine.plan.PLAN_FIELDS, where they are not the proto's enums) give one
    ReductionPlan, and a field not given takes ReductionPlan's default in each."""
    from aim_engine.plan import PLAN_FIELDS as FIELD_TABLE
    from aim_engine.plan import format_prune_stages, parse_plan, plan_from_values, plan_to_dict
    from service.openai_convert import _reduction

    assert {f.name for f in FIELD_TABLE} == PLAN_FIELDS
    for plan in PLANS[::5]:
        given = {k: v for k, v in plan_to_dict(plan).items() if v not in (None, [])}
        text = ",".join(f"{k}={format_prune_stages(plan.prune_stages) if k == 'prune_stages' else v}"
                        for k, v in given.items())
        forms = {"cli": _cli_plan(plan) if plan.merges or plan.prunes else plan,
                 "proto": plan_from_proto(plan_to_proto(plan)),
                 "kserve": plan_from_parameters(plan_to_parameters(plan)),
                 "http": _reduction({"plan": given}).plan,
                 "text": parse_plan(text),
                 "dict": plan_from_values(given)}
        assert all(p == plan for p in forms.values()), (plan, forms)
    assert _reduction({"plan": {"merge_retention": 0.5}}).plan == plan_from_parameters(
        {"aim_merge_retention": 0.5}) == parse_plan("merge_retention=0.5") == ReductionPlan(merge_retention=0.5)


def _cli_plan(plan: ReductionPlan) -> ReductionPlan:
    """The plan the client's command line gives for `plan`'s flags (every rule given: no model default asked)."""
    from aim_engine.plan import format_prune_stages

    argv = ["generate"]
    if plan.merge_tokens is not None:
        argv += ["--merge-tokens", str(plan.merge_tokens)]
    if plan.merge_retention is not None:
        argv += ["--merge-retention", repr(plan.merge_retention)]
    if plan.prune_start is not None:
        argv += ["--prune", str(plan.prune_start), str(plan.prune_end)]
    if plan.prune_stages:
        argv += ["--prune-stages", format_prune_stages(plan.prune_stages)]
    argv += ["--importance", plan.importance, "--reducer", plan.reducer, "--positions", plan.positions,
             "--proportional-attention" if plan.proportional_attention else "--no-proportional-attention",
             "--merge-pruned" if plan.merge_pruned else "--no-merge-pruned"]
    return plan_from_flags(build_parser().parse_args(argv), model_default=None)



@pytest.mark.parametrize("params,message", [
    (dict(aim_stop="[1, 2"), "is neither a stop string nor a JSON list of strings"),
    (dict(aim_stop='["END", 3]'), "is neither a stop string nor a JSON list of strings"),
    (dict(aim_min_retention=1.5), "aim_min_retention must be in [0, 1], got 1.5"),
    (dict(aim_min_retention=-0.25), "aim_min_retention must be in [0, 1], got -0.25"),
    (dict(aim_slo_ms=-5), "aim_slo_ms must be >= 0"),
])
def test_malformed_oip_parameters_are_invalid_arguments_not_internal(params, message):
    with pytest.raises(ServiceError, match=re.escape(message)) as err:
        KSERVE.parse_request(_infer_request(params))
    assert err.value.status == "invalid_argument"


def test_oip_stop_strings_come_as_one_string_or_a_json_list():
    assert KSERVE.parse_request(_infer_request({"aim_stop": "END"}))[0].sampling.stop == ("END",)
    assert KSERVE.parse_request(_infer_request({"aim_stop": '["END", "\\n\\n"]'}))[0].sampling.stop == ("END", "\n\n")
