"""The client commands: generate, stream, estimate, info, health. grpc and the stubs only: these never load torch
(a backend installs `aim-serve` without extras)."""

from __future__ import annotations

from .flags import choose_plan, client_flags, number, reduction_flags, request_flags
from .output import plan_line, prefill_line, print_json, print_summary


def _client(args):
    from service.client import AimClient

    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    return AimClient(args.target, token=args.token, root_certificates=ca, timeout=args.timeout)


def request_kwargs(args, client=None) -> dict:
    """The client's keyword arguments for the request the flags describe (the plan chosen by flags.choose_plan;
    the model's default plan asked of the server only when needed)."""
    from service.plan_proto import plan_from_proto

    kind, plan = choose_plan(args, lambda: plan_from_proto(client.model_info(args.model).default_plan), auto=True)
    return dict(images=args.image, videos=args.video, frames=args.frames, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos, plan=plan, no_reduction=kind == "none", slo_ms=args.slo_ms,
                min_retention=args.min_retention, priority=args.priority, model=args.model,
                system_prompt=args.system)


def cmd_generate(args) -> int:
    with _client(args) as client:
        response = client.generate(args.prompt, **request_kwargs(args, client))
    if args.json:
        print_json(response)
    else:
        print(response.text)
        print_summary(response)
    return 0


def cmd_stream(args) -> int:
    with _client(args) as client:
        events = client.stream_events(args.prompt, **request_kwargs(args, client))
        for event in events:
            if args.json:
                print_json(event)
            elif event.HasField("result"):
                print()
                print_summary(event.result)
            else:
                print(event.text_delta, end="", flush=True)
    return 0


def cmd_estimate(args) -> int:
    with _client(args) as client:
        est = client.estimate(args.prompt, **request_kwargs(args, client))
    if args.json:
        print_json(est)
        return 0
    print(plan_line(est.applied_plan))
    print(f"visual tokens: {est.visual_tokens_in} in -> {est.visual_tokens_merged} after merging")
    print(prefill_line(est.prefill_flops, est.baseline_prefill_flops))
    print(f"predicted latency: {1e3 * est.predicted_latency_seconds:.0f} ms (queue included)")
    return 0


def cmd_info(args) -> int:
    from service.plan_proto import plan_from_proto

    with _client(args) as client:
        info = client.model_info(args.model)
    if args.json:
        print_json(info)
        return 0
    default = plan_from_proto(info.default_plan)
    pruning = "with progressive pruning" if default.prune_start or default.prune_stages else "merging only, no pruning"
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    lim = info.limits
    print(f"model: {info.model} ({info.family}, {info.num_layers} layers, hidden {info.hidden_size}, "
          f"video {'yes' if info.supports_video else 'no'})")
    print(f"default plan: {default.describe()} ({pruning})")
    print(f"limits: {mib(lim.max_media_bytes)} a media item, {lim.max_pixels} pixels an image or frame, "
          f"{lim.max_frames} frames a video, {lim.max_new_tokens} new tokens, {mib(lim.max_message_bytes)} a message")
    print(f"served models: {', '.join(info.served_models)}")
    return 0


def cmd_health(args) -> int:
    """grpc.health.v1 Check: exit 0 when SERVING (container health checks; no grpc_health_probe needed)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                          timeout=args.timeout)
    if args.json:
        print_json(reply)
    else:
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_commands(command) -> None:
    for name, func, text in (("generate", cmd_generate, "one request; prints the answer and a summary"),
                             ("stream", cmd_stream, "one request; prints the answer as it comes, then a summary"),
                             ("estimate", cmd_estimate, "predict a request's plan, FLOPs and latency; nothing runs")):
        p = command(name, func, text)
        client_flags(p)
        request_flags(p, client=True)
        p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens (benchmarks)")
        reduction_flags(p, auto=True)

    info = command("info", cmd_info, "describe a served model: family, depth, default plan, limits")
    client_flags(info)
    info.add_argument("--json", action="store_true", help="print the whole response as JSON")

    health = command("health", cmd_health, "exit 0 if the server reports SERVING (container health checks)")
    health.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the server's address")
    health.add_argument("--service", default="", help="service name; empty = the whole server")
    health.add_argument("--timeout", type=number(float, 0, low_open=True), default=5.0, metavar="S",
                        help="deadline, seconds")
    health.add_argument("--json", action="store_true", help="print the whole response as JSON")
