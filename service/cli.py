"""`aim-serve`: the command line of the project.

    aim-serve serve --model DIR [--model NAME=DIR ...] [--port 50051] ...   run the gRPC server
    aim-serve generate --target HOST:PORT --prompt ... [--video F] [--image F] [--slo-ms N | --plan ... | --none]
    aim-serve stream   (same flags; prints text as it arrives)
    aim-serve info / estimate
    aim-serve ask / eval / build-reference / train-reference / build-tiny / sample-media   the engine alone
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import json
import logging
import sys

from aim_engine import cli as engine_cli
from controller.policy import PRIORITIES

from .settings import Settings


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="server address")
    p.add_argument("--token", help="bearer token")
    p.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--model", default="", help="served model name (default: the server's default)")
    p.add_argument("--prompt", default="Describe it.")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--video", action="append", default=[])
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens (benchmarks)")
    p.add_argument("--slo-ms", type=int, default=0, help="auto: latency target")
    p.add_argument("--min-retention", type=float, default=0.0, help="auto: quality floor")
    p.add_argument("--priority", choices=PRIORITIES,
                   help="auto: low is reduced first, high last (the decision's safety margin)")
    p.add_argument("--none", action="store_true", help="no reduction")
    p.add_argument("--aim-default", action="store_true", help="the served model's default AIM plan")
    engine_cli.add_plan_flags(p)  # an explicit plan when any merge or prune flag is given


def _client(args):
    from .client import AimClient

    ca = open(args.tls_ca, "rb").read() if args.tls_ca else None
    return AimClient(args.target, token=args.token, root_certificates=ca, timeout=args.timeout)


def _request_kwargs(args, client=None) -> dict:
    plan = None
    if args.aim_default:
        from .convert import plan_from_proto

        plan = plan_from_proto(client.model_info(args.model).default_plan)
    elif engine_cli.plan_flags_given(args):
        plan = engine_cli.plan_from_flags(args)
    return dict(images=args.image, videos=args.video, frames=args.frames, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos, plan=plan,
                no_reduction=args.none,
                slo_ms=args.slo_ms, min_retention=args.min_retention, priority=args.priority, model=args.model)


def _print_result(result) -> None:
    from google.protobuf.json_format import MessageToDict

    summary = MessageToDict(result, preserving_proto_field_name=True)
    summary.pop("text", None)
    print(json.dumps(summary, indent=2))


def cmd_serve(args) -> int:
    argv = sys.argv[sys.argv.index("serve") + 1:] if "serve" in sys.argv else []
    settings = Settings.load(argv)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import serve

    asyncio.run(serve(settings))
    return 0


def cmd_generate(args) -> int:
    with _client(args) as client:
        result = client.generate(args.prompt, **_request_kwargs(args, client))
    print(result.text)
    _print_result(result)
    return 0


def cmd_stream(args) -> int:
    with _client(args) as client:
        for delta in client.stream(args.prompt, **_request_kwargs(args, client)):
            print(delta, end="", flush=True)
        print()
        _print_result(client.last_result)
    return 0


def cmd_info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        print(json.dumps(MessageToDict(client.model_info(args.model), preserving_proto_field_name=True), indent=2))
    return 0


def cmd_estimate(args) -> int:
    with _client(args) as client:
        _print_result(client.estimate(args.prompt, **_request_kwargs(args, client)))
    return 0


def cmd_health(args) -> int:
    """grpc.health.v1 Check: exit 0 when SERVING (container health checks; no grpc_health_probe needed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5).status
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = engine_cli.build_parser()
    parser.description = __doc__
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.add_parser("serve", help="run the gRPC server (flags: see README, or --help)", add_help=False)
    serve.set_defaults(func=cmd_serve)
    Settings.argument_parser(serve)
    serve.add_argument("-h", "--help", action="help")
    for name, func, helptext in (("generate", cmd_generate, "one request, whole answer"),
                                 ("stream", cmd_stream, "one request, streamed answer"),
                                 ("info", cmd_info, "describe a served model"),
                                 ("estimate", cmd_estimate, "predict a request's cost")):
        p = sub.add_parser(name, help=helptext)
        _client_flags(p)
        p.set_defaults(func=func)
    health = sub.add_parser("health", help="exit 0 if the server reports SERVING")
    health.add_argument("--target", default="127.0.0.1:50051")
    health.add_argument("--service", default="", help="service name; empty = the whole server")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
