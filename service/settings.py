"""One settings object for the server, from (highest precedence first) command-line flags, `AIM_*` environment
variables, a TOML/JSON file (`--config` / `AIM_CONFIG`), and the defaults below. Every field is documented
here once; the README's table is generated from the same metadata (`settings_table()`)."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Settings:
    models: list[str] = field(default_factory=list, metadata={
        "help": "models to serve: PATH or NAME=PATH (local checkpoint directories); the first is the default"})
    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(50051, "gRPC port (0 = pick a free one)")
    http_port: int = _f(-1, "OpenAI-compatible HTTP API port, beside gRPC over the same models (0 = pick a free "
                         "one, -1 = off)")
    metrics_port: int = _f(9464, "Prometheus /metrics HTTP port (0 = pick a free one, -1 = off)")
    device: str = _f("cpu", "torch device for the models: cpu, cuda, cuda:1")
    dtype: str = _f("float32", "model dtype: float32, bfloat16, float16")
    max_batch: int = _f(32, "most sequences decoding together per model (continuous batching; 1 = one at a time)")
    kv_cache_bytes: int = _f(0, "KV cache pool per model, bytes (0 = default: 2 GiB on CPU; on CUDA 85% of the "
                             "memory free after loading, less 2 GiB)")
    prefill_tokens_per_step: int = _f(1024, "prompt tokens (after merging) admitted to prefill per engine step, at "
                                      "least one request (the work each step runs is step_budget's)")
    step_budget: float = _f(4.0, "prefill work (vision, LLM layers) one engine step runs beside the running batch's "
                            "decode, as a multiple of that decode step as the cost model predicts it: an arrival "
                            "stalls streaming answers by at most about 1 + this many decode steps (0 = one piece "
                            "per step; -1 = unsliced: an admitted prompt's whole prefill in one step)")
    decode_workspace_bytes: int = _f(256 * 1024**2, "keys and values one decode attention gather may hold at one "
                                     "layer, bytes; a batch whose padded keys need more is attended in length "
                                     "groups (a sequence longer than it alone)")
    max_queue: int = _f(16, "requests waiting beyond a full batch before new ones get RESOURCE_EXHAUSTED")
    max_message_bytes: int = _f(64 * 1024 * 1024, "largest gRPC message received or sent, and largest HTTP request "
                                "body (media in base64 take 4/3 of their size), bytes")
    max_media_bytes: int = _f(64 * 1024 * 1024, "largest image or video, bytes")
    max_pixels: int = _f(40_000_000, "largest image or video frame, pixels")
    max_frames: int = _f(64, "most frames sampled from one video")
    max_decoded_bytes: int = _f(512 * 1024 * 1024, "one request's decoded media (RGB, 3 bytes a pixel, frames at the "
                                "size the model uses), checked from the headers before decoding; over it: "
                                "INVALID_ARGUMENT")
    max_decoded_frames: int = _f(20_000, "frames one request's videos may decode (sampling decodes through the frames "
                                 "between keyframes), checked from the stream's packets before decoding; over it: "
                                 "INVALID_ARGUMENT")
    media_memory_bytes: int = _f(2 * 1024**3, "decoded media held by all of one model's requests; a request reserves "
                                 "its whole need from the headers and waits for room before decoding, without a "
                                 "worker; given back once through the vision tower (at least max_decoded_bytes)")
    feature_cache_bytes: int = _f(-1, "visual features kept per model for repeated images and videos, bytes "
                                  "(-1 = sized for the device: 512 MiB on CPU, 5% of GPU memory; 0 = off)")
    prefix_cache_bytes: int = _f(-1, "KV of shared prompt prefixes (system prompt + media) kept for the next "
                                 "question about the same media, inside the KV pool and evicted when admission "
                                 "needs room; plans without pruning; bytes (-1 = a quarter of the pool; 0 = off)")
    media_workers: int = _f(2, "threads per model decoding media (and estimating costs) before requests join the "
                            "batch")
    max_concurrent_rpcs: int = _f(0, "RPCs the gRPC server runs at once, beyond which it answers RESOURCE_EXHAUSTED "
                                  "itself (0 = models x (max_batch + max_queue) + max_health_watches + 32, the "
                                  "last for probes and short calls)")
    max_health_watches: int = _f(64, "grpc.health.v1 Watch streams open at once (more: RESOURCE_EXHAUSTED); Check, "
                                 "what probes call, is not limited")
    max_connection_idle_s: float = _f(300.0, "gRPC: a connection without an RPC for this long is closed, seconds")
    max_connection_age_s: float = _f(3600.0, "a connection this old is asked to reconnect: gRPC's by GOAWAY, the HTTP "
                                     "API's by `Connection: close` on its next answer; seconds")
    max_connection_age_grace_s: float = _f(600.0, "gRPC: how long RPCs on a connection asked to reconnect may still "
                                           "run, seconds")
    http_max_connections: int = _f(512, "HTTP API: connections open at once; one more is answered 503 and closed at "
                                   "once (probes use gRPC's health Check, which this does not touch)")
    http_idle_s: float = _f(5.0, "HTTP API: a connection whose next request has not arrived whole (its head) this "
                            "long after it opened or after its last answer is closed: keep-alive and slow headers, "
                            "seconds")
    http_read_s: float = _f(60.0, "HTTP API: a request whose body has not arrived whole this long after its head is "
                            "dropped with its connection (not run; counted as cancelled), seconds")
    allowed_local_media_path: str = _f("", "HTTP API: a directory whose files `file://` media URLs may name "
                                       "(symlinks resolved; empty = file:// refused)")
    allowed_media_domains: str = _f("", "HTTP API: hosts http(s) media URLs may name, comma-separated (the server "
                                    "fetches them, redirects refused; empty = remote URLs refused)")
    default_frames: int = _f(8, "frames sampled from a video when the request does not say")
    max_new_tokens: int = _f(1024, "most tokens one request may generate")
    default_max_new_tokens: int = _f(128, "tokens generated when the request does not say")
    default_slo_ms: int = _f(10_000, "latency target of `auto` requests that give none, and of the feedback loop, ms")
    min_slo_ms: int = _f(50, "smallest latency target a request may give, ms; below it: INVALID_ARGUMENT (an SLO no "
                         "request can meet would only push the controller to maximum saving)")
    ladder_file: str = _f("", "quality ladder (TOML/JSON [[level]] tables); empty = the paper's Pareto points")
    prometheus_url: str = _f("", "Prometheus base URL for the p95 signal (empty = the service's own window only)")
    prometheus_query: str = _f("", "PromQL for the p95 of latency / SLO (a ratio: 1 = at the "
                                  "SLO); `{model}` is replaced; empty = the default query")
    feedback_interval_s: float = _f(2.0, "seconds between feedback steps on the safety margin")
    gpu_memory_threshold: float = _f(0.9, "memory pressure above which `auto` quality is capped at the AIM default: "
                                     "the KV pool's reserved share, or on CUDA the share of device memory outside "
                                     "the pool the allocator can no longer give")
    calibrate: int = _f(1, "warm-up requests per ladder level at start to seed the cost model (0 = none)")
    drain_seconds: float = _f(30.0, "on SIGTERM: how long in-flight requests may finish before exit")
    tls_cert: str = _f("", "PEM certificate chain; with tls_key, serve TLS")
    tls_key: str = _f("", "PEM private key")
    auth_token: str = _f("", "if set, every RPC and HTTP API call needs `authorization: Bearer <token>` (health "
                         "checks and probes excepted)")
    log_level: str = _f("INFO", "Python log level")

    def model_paths(self) -> dict[str, Path]:
        """NAME -> directory, in order (the first is the default)."""
        out: dict[str, Path] = {}
        for spec in self.models:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name, spec
            out[name] = Path(path)
        return out

    def validate(self) -> None:
        if not self.models:
            raise ValueError("no model to serve: pass --model PATH (or NAME=PATH), or set AIM_MODELS")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key")
        for name in ("max_batch", "prefill_tokens_per_step", "max_frames", "default_frames", "max_new_tokens",
                     "default_max_new_tokens", "max_decoded_bytes", "max_decoded_frames", "media_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (self.step_budget >= 0 or self.step_budget == -1) or self.step_budget == float("inf"):
            raise ValueError(f"step_budget must be a finite number >= 0, or -1 (unsliced); got {self.step_budget}")
        if self.decode_workspace_bytes < 1:
            raise ValueError("decode_workspace_bytes must be >= 1")
        if self.kv_cache_bytes < 0:
            raise ValueError("kv_cache_bytes must be >= 0 (0 = the default)")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.media_memory_bytes < self.max_decoded_bytes:
            raise ValueError(f"media_memory_bytes ({self.media_memory_bytes}) must be >= max_decoded_bytes "
                             f"({self.max_decoded_bytes}): one request must fit")
        if self.prefix_cache_bytes < -1:
            raise ValueError("prefix_cache_bytes must be >= -1 (-1 = a quarter of the KV pool, 0 = off)")
        if self.feature_cache_bytes < -1:
            raise ValueError("feature_cache_bytes must be >= -1 (-1 = sized for the device, 0 = off)")
        if self.http_port < -1:
            raise ValueError("http_port must be >= -1 (-1 = off, 0 = pick a free one)")
        if self.allowed_local_media_path and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")
        if not 0 < self.min_slo_ms <= self.default_slo_ms:
            raise ValueError(f"min_slo_ms must be > 0 and at most default_slo_ms ({self.default_slo_ms}); got "
                             f"{self.min_slo_ms}")
        if self.max_concurrent_rpcs < 0:
            raise ValueError("max_concurrent_rpcs must be >= 0 (0 = derived)")
        if self.max_health_watches < 0:
            raise ValueError("max_health_watches must be >= 0")
        if self.max_concurrent_rpcs and self.max_concurrent_rpcs <= self.max_health_watches:
            raise ValueError(f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must exceed max_health_watches "
                             f"({self.max_health_watches}), or health watches could take every RPC from probes")
        if self.http_max_connections < 1:
            raise ValueError("http_max_connections must be >= 1")
        for name in ("max_connection_idle_s", "max_connection_age_s", "max_connection_age_grace_s", "http_idle_s",
                     "http_read_s"):
            if not (0 < getattr(self, name) < float("inf")):
                raise ValueError(f"{name} must be a finite number of seconds > 0")

    def media_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.allowed_media_domains.split(",") if h.strip())

    def concurrent_rpcs(self) -> int:
        """The gRPC server's maximum_concurrent_rpcs."""
        if self.max_concurrent_rpcs:
            return self.max_concurrent_rpcs
        return max(1, len(self.models)) * (self.max_batch + self.max_queue) + self.max_health_watches + 32

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> "Settings":
        return cls.from_args(cls.argument_parser().parse_args(argv or []), env)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: dict[str, str] | None = None) -> "Settings":
        """Settings from parsed flags (`argument_parser`'s), the environment and the file they name."""
        env = dict(os.environ if env is None else env)
        values: dict = {}
        config_file = args.config or env.get("AIM_CONFIG")
        if config_file:
            values.update(_read_file(Path(config_file)))
        for f in fields(cls):
            raw = env.get(f"AIM_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        for f in fields(cls):
            given = getattr(args, f.name)
            if given is not None:
                values[f.name] = given
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def argument_parser(cls, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
        parser = parser or argparse.ArgumentParser(prog="aim-serve serve")
        parser.add_argument("--config", help="settings file (TOML or JSON); also AIM_CONFIG")
        for f in fields(cls):
            env = f"AIM_{f.name.upper()}"
            if f.name == "models":
                parser.add_argument("--model", dest="models", action="append", metavar="[NAME=]DIR",
                                    help=f"{f.metadata['help']}; repeatable; env {env}, comma-separated")
            else:
                # the argparse default stays None so that the environment and the file can fill what no flag gave
                text = f"{f.metadata['help']} (default: {f.default!r}; env {env})".replace("%", "%%")
                parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_type_of(f), help=text,
                                    metavar=_type_of(f).__name__.upper())
        return parser


def _type_of(f):
    return {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)


def _parse(f, raw: str):
    if f.name == "models":
        return [m for m in raw.replace(",", " ").split() if m]
    return _type_of(f)(raw)


def _read_file(path: Path) -> dict:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    return {k.replace("-", "_"): v for k, v in data.items()}


def settings_table() -> str:
    """Markdown table of every setting: flag, environment variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else "[]"
        flag = "--model (repeatable)" if f.name == "models" else "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `AIM_{f.name.upper()}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
