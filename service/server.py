"""Builds and runs the gRPC server: AimService, the Open Inference Protocol, grpc.health.v1, reflection,
Prometheus metrics on their own HTTP port, optional TLS and bearer token. SIGTERM drains, then exits."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aim_engine import AimEngine, MediaLimits, StepBudget

from .aim_api import AimServicer
from .health import SERVICE_NAME as HEALTH_SERVICE, HealthService
from .registry import ServedModels
from . import allocator
from .interceptors import BearerTokenInterceptor, MalformedRequestInterceptor, MetricsInterceptor
from .kserve import InferenceServicer
from .metrics import ServiceMetrics
from .proto.aim.v1 import aim_service_pb2, aim_service_pb2_grpc
from .proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from .runtime import ModelRuntime
from controller.controller import DEFAULT_P95_QUERY, BudgetController, ControllerConfig
from controller.feedback import FeedbackConfig
from controller.policy import default_ladder, load_ladder
from controller.signals import GpuSampler, PromQLReader
from .settings import Settings

log = logging.getLogger("aim.service")

AIM_SERVICE = aim_service_pb2.DESCRIPTOR.services_by_name["AimService"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVICES = (AIM_SERVICE, INFERENCE_SERVICE)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    state: ServedModels
    health: HealthService
    port: int
    metrics_port: int | None
    _metrics_http: object = None
    http_port: int | None = None  # the OpenAI-compatible HTTP API's, when on
    _http: object = None  # (uvicorn server, its task)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.state.accepting = serving
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def drain_and_stop(self, grace: float) -> None:
        """Stop accepting, report NOT_SERVING, let in-flight requests finish (up to `grace` seconds), stop."""
        await self.set_serving(False)
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self.state.in_flight() and loop.time() < end:
            await asyncio.sleep(0.05)
        await self.health.close()  # watchers have heard NOT_SERVING; their streams would outlast any grace
        await self.server.stop(max(0.0, end - loop.time()))
        if self._http is not None:
            http, task = self._http
            http.should_exit = True
            await task
        for runtime in self.state.runtimes.values():
            runtime.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()


def load_engines(settings: Settings) -> dict[str, AimEngine]:
    import torch

    limits = MediaLimits(max_bytes=settings.max_media_bytes, max_pixels=settings.max_pixels,
                         max_frames=settings.max_frames, max_decoded_bytes=settings.max_decoded_bytes,
                         max_decoded_frames=settings.max_decoded_frames)
    return {name: AimEngine.load(path, device=settings.device, dtype=getattr(torch, settings.dtype), limits=limits,
                                 kv_cache_bytes=settings.kv_cache_bytes or None,
                                 feature_cache_bytes=None if settings.feature_cache_bytes < 0
                                 else settings.feature_cache_bytes,
                                 prefix_cache_bytes=None if settings.prefix_cache_bytes < 0
                                 else settings.prefix_cache_bytes)
            for name, path in settings.model_paths().items()}


async def start_listening(settings: Settings, metrics: ServiceMetrics | None = None) -> RunningServer:
    """Binds and starts the server with health NOT_SERVING and no model yet (every RPC: UNAVAILABLE)."""
    metrics = metrics or ServiceMetrics()
    state = ServedModels(settings, metrics)
    interceptors = [MetricsInterceptor(metrics), MalformedRequestInterceptor()]
    if settings.auth_token:
        interceptors.insert(0, BearerTokenInterceptor(settings.auth_token))
    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes),
               ("grpc.so_reuseport", 0),
               # a connection with no RPC for this long is closed; any connection is asked to go (GOAWAY) at this
               # age, its RPCs given the grace to finish: clients reconnect, none holds a connection for ever
               ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)),
               ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
               ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000))]
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=settings.concurrent_rpcs())
    aim_service_pb2_grpc.add_AimServiceServicer_to_server(AimServicer(state), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_servicer = HealthService(settings.max_health_watches)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert:
        with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()

    metrics_port, http = None, None
    if settings.metrics_port >= 0:
        from prometheus_client import start_http_server

        http, _thread = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        metrics_port = http.server_port
    running = RunningServer(server, state, health_servicer, port, metrics_port, http)
    if settings.http_port >= 0:
        running.http_port, running._http = await _start_http(state, settings)
    await running.set_serving(False)
    log.info("listening on %s:%d (metrics %s, HTTP API %s)", settings.host, port,
             "off" if metrics_port is None else f"on port {metrics_port}",
             "off" if running.http_port is None else f"on port {running.http_port}")
    return running


async def _start_http(state: ServedModels, settings: Settings):
    """The OpenAI-compatible HTTP API in this event loop, over the same models: (port, (server, task))."""
    import socket

    from .openai_api import http_server

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.http_port))
    http = http_server(state, sock, settings.drain_seconds)
    task = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started:
        if task.done():  # it failed to start: its exception, here
            await task
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    return sock.getsockname()[1], (http, task)


def build_controller(settings: Settings, name: str, engine: AimEngine, gpu) -> BudgetController:
    ladder = load_ladder(settings.ladder_file, engine.num_layers) if settings.ladder_file else \
        default_ladder(engine.num_layers, engine.default_plan())
    prometheus = None
    if settings.prometheus_url:
        query = (settings.prometheus_query or DEFAULT_P95_QUERY).replace("{model}", name)
        # a value older than 10 feedback intervals (at least 5 s) is stale: fall back to the local window
        prometheus = PromQLReader(settings.prometheus_url, query, interval_s=settings.feedback_interval_s,
                                  stale_after_s=max(5.0, 10 * settings.feedback_interval_s)).start()
    config = ControllerConfig(slo_s=settings.default_slo_ms / 1000, memory_threshold=settings.gpu_memory_threshold,
                              feedback=FeedbackConfig(interval_s=settings.feedback_interval_s))
    return BudgetController(ladder, config, gpu=gpu, prometheus=prometheus, memory=engine.memory_pressure)


async def load_models(running: RunningServer, engines: dict[str, AimEngine] | None = None) -> None:
    """Loads the models off the event loop (unless given), calibrates each controller's cost model with
    warm-up requests, then reports SERVING."""
    settings, state = running.state.settings, running.state
    loop = asyncio.get_running_loop()
    if engines is None:
        engines = await loop.run_in_executor(None, load_engines, settings)
    gpu = GpuSampler(expect_gpu=settings.device.startswith("cuda")).start()
    for name, engine in engines.items():
        engine.loop.limit(settings.max_batch, settings.prefill_tokens_per_step,  # the settings' limits, given once
                          StepBudget(None if settings.step_budget < 0 else settings.step_budget),
                          settings.decode_workspace_bytes)
        runtime = ModelRuntime(
            name, engine, state.metrics, max_queue=settings.max_queue,
            default_frames=settings.default_frames, default_slo_s=settings.default_slo_ms / 1000,
            min_slo_s=settings.min_slo_ms / 1000,
            media_workers=settings.media_workers, media_memory_bytes=settings.media_memory_bytes,
            controller=build_controller(settings, name, engine, gpu))
        if settings.calibrate:
            await loop.run_in_executor(None, runtime.calibrate, settings.calibrate)
        state.runtimes[name] = runtime
        log.info("model %s ready (%s, %d layers)", name, engine.adapter.family, engine.num_layers)
    await running.set_serving(True)


async def start_server(settings: Settings, engines: dict[str, AimEngine] | None = None,
                       metrics: ServiceMetrics | None = None) -> RunningServer:
    """Listens at once (health NOT_SERVING), loads the models, then SERVING."""
    running = await start_listening(settings, metrics)
    await load_models(running, engines)
    return running


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains."""
    allocator.tune()
    running = await start_server(settings)
    metrics = f"on http://{settings.host}:{running.metrics_port}/metrics" if running.metrics_port is not None \
        else "off"
    http = f" (OpenAI-compatible API on http://{settings.host}:{running.http_port}/v1)" \
        if running.http_port is not None else ""
    print(f"aim-serve listening on {settings.host}:{running.port}; metrics {metrics}{http}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0fs)", settings.drain_seconds)
    await running.drain_and_stop(settings.drain_seconds)
    log.info("stopped")
