"""Prometheus metrics of the service: every name is defined here once. Labels have bounded cardinality
(model name, outcome, plan source, gRPC method/code) and never carry a request id.

The gRPC server metrics keep go-grpc-prometheus's names (grpc_server_started_total, grpc_server_handled_total,
grpc_server_msg_received_total, grpc_server_msg_sent_total, grpc_server_handling_seconds)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .allocator import free_heap_bytes

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SLO_RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10)
RETENTION_BUCKETS = (0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        m = ["model"]
        self.requests = Counter("aim_requests_total", "Generation requests by outcome (ok, cancelled, "
                                "invalid_argument, resource_exhausted, deadline_exceeded, unavailable, not_found, "
                                "internal).", m + ["outcome"], registry=r)
        self.latency = Histogram("aim_request_duration_seconds", "End-to-end latency of answered requests.",
                                 m + ["slo_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("aim_queue_wait_seconds", "Time from arrival to a free worker.", m,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("aim_time_to_first_token_seconds", "Arrival to first generated token.", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("aim_prefill_duration_seconds", "LLM prefill (merging and pruning included).", m,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("aim_time_per_output_token_seconds", "Decode time per generated token after the first.",
                              m, buckets=TOKEN_TIME_BUCKETS, registry=r)
        self.in_flight = Gauge("aim_requests_in_flight", "Sequences in the running batch (prefilled or decoding).", m,
                               registry=r)
        self.queue_depth = Gauge("aim_queue_depth", "Admitted requests not in the running batch: decoding media, or "
                                 "waiting for a place in the batch or for KV memory.", m, registry=r)
        self.batch_size = Histogram("aim_batch_size", "Sequences in each batched decode step.", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.kv_usage = Gauge("aim_kv_cache_usage_ratio", "Share of the KV pool's blocks holding tokens.", m,
                              registry=r)
        self.kv_reserved = Gauge("aim_kv_cache_reserved_ratio", "Share of the KV pool's blocks held or promised to "
                                 "admitted sequences (what admission sees).", m, registry=r)
        self.kv_used_bytes = Gauge("aim_kv_cache_used_bytes", "Bytes of the KV pool in blocks holding tokens.", m,
                                   registry=r)
        self.kv_capacity_bytes = Gauge("aim_kv_cache_capacity_bytes", "Bytes of the KV pool (--kv-cache-bytes, "
                                       "whole blocks).", m, registry=r)
        self.feature_cache_hits = Counter("aim_feature_cache_hits_total", "Images and videos whose visual features "
                                          "came from the feature cache (no decoding, no vision encoder).", m,
                                          registry=r)
        self.feature_cache_misses = Counter("aim_feature_cache_misses_total", "Images and videos encoded and put in "
                                            "the feature cache.", m, registry=r)
        self.feature_cache_evictions = Counter("aim_feature_cache_evictions_total", "Entries the feature cache "
                                               "dropped to stay within its budget.", m, registry=r)
        self.feature_cache_saved = Counter("aim_feature_cache_saved_seconds_total", "Vision-encoder seconds the "
                                           "feature cache's hits did not spend.", m, registry=r)
        self.feature_cache_bytes = Gauge("aim_feature_cache_bytes", "Bytes of visual features the cache holds.", m,
                                         registry=r)
        self.feature_cache_capacity = Gauge("aim_feature_cache_capacity_bytes", "The feature cache's budget "
                                            "(--feature-cache-bytes; 0 = off).", m, registry=r)
        self.prefix_cache_hits = Counter("aim_prefix_cache_hits_total", "Prefills that started after a reused "
                                         "prefix (its KV from an earlier request).", m, registry=r)
        self.prefix_cache_misses = Counter("aim_prefix_cache_misses_total", "Prefills with a reusable prefix not in "
                                           "the cache (it was computed and offered to it).", m, registry=r)
        self.prefix_cache_evictions = Counter("aim_prefix_cache_evictions_total", "Prefixes dropped for room (the "
                                              "cache's budget or admission).", m, registry=r)
        self.prefix_cache_tokens = Counter("aim_prefix_cache_reused_tokens_total", "Prompt tokens whose prefill a "
                                           "reused prefix saved.", m, registry=r)
        self.prefix_cache_bytes = Gauge("aim_prefix_cache_bytes", "Bytes of the KV pool held by cached prefixes.",
                                        m, registry=r)
        self.media_memory_bytes = Gauge("aim_media_memory_bytes", "Bytes of decoded media the model's requests hold "
                                        "(reserved before decoding, given back after the vision tower).", m,
                                        registry=r)
        self.visual_in = Counter("aim_visual_tokens_in_total", "Visual tokens from the vision encoder.", m, registry=r)
        self.visual_merged = Counter("aim_visual_tokens_merged_total", "Visual tokens after merging (LLM input).", m,
                                     registry=r)
        self.flops_baseline = Counter("aim_llm_prefill_flops_baseline_total",
                                      "LLM prefill FLOPs the requests would have cost with no reduction.", m, registry=r)
        self.flops_actual = Counter("aim_llm_prefill_flops_total", "LLM prefill FLOPs actually spent.", m, registry=r)
        self.flops_reused = Counter("aim_llm_prefill_flops_reused_total", "LLM prefill FLOPs a reused prompt prefix "
                                    "spared (the prefix cache's saving; AIM's is baseline - spent - this).", m,
                                    registry=r)
        self.retention = Histogram("aim_visual_token_retention_ratio",
                                   "Per request: visual tokens after merging / visual tokens in.", m,
                                   buckets=RETENTION_BUCKETS, registry=r)
        self.plans = Counter("aim_plans_total", "Applied plans by source (none, explicit, auto).", m + ["source"],
                             registry=r)
        self.model_ready = Gauge("aim_model_ready", "1 when the model is loaded and serving.", m, registry=r)
        self.slo_violations = Counter("aim_slo_violations_total", "Requests that missed their latency SLO: answered "
                                      "late, cut off by their deadline, rejected for load, or cancelled after "
                                      "their SLO had passed.", m + ["slo_class"], registry=r)
        self.slo_ratio = Histogram("aim_request_latency_slo_ratio", "Latency over the request's own SLO, of every "
                                   "request the controller steers by (auto plans; failures included, at the "
                                   "latency its window counts them): the signal its default PromQL reads.",
                                   m + ["slo_class"], buckets=SLO_RATIO_BUCKETS, registry=r)
        self.heap_free = Gauge("aim_heap_free_bytes", "Bytes free inside the process's malloc heaps: held, "
                               "nothing uses them; given back once they pass 64 MiB (service/allocator.py; NaN "
                               "without glibc).", registry=r)
        self.heap_free.set_function(lambda: _nan_if_none(free_heap_bytes()))

        self.controller_level = Gauge("aim_controller_level", "Ladder level of the last auto decision (0 = full "
                                      "quality; higher = more saving).", m, registry=r)
        self.controller_decisions = Counter("aim_controller_decisions_total", "Auto decisions by ladder level and "
                                            "outcome (fits, best_effort, no_data, rejected).",
                                            m + ["level", "outcome"], registry=r)
        self.controller_levels = Gauge("aim_controller_levels", "Levels in the quality ladder (the last one, "
                                       "levels - 1, is maximum saving).", m, registry=r)
        self.controller_margin = _MarginCollector()  # aim_controller_margin{model, slo_class}
        r.register(self.controller_margin)
        self.controller_p95 = Gauge("aim_controller_p95_slo_ratio", "p95 of latency / SLO the feedback loop last "
                                    "acted on (NaN before any).", m, registry=r)
        self.prediction_ratio = Histogram("aim_controller_prediction_ratio", "Observed / forecast latency of auto "
                                          "requests, from the decision (media decoded) to the answer, by the "
                                          "ladder level chosen: a decision that expected no request next has "
                                          "its forecast moved later by the work that joined after it (what the "
                                          "controller's prediction-error floor reads).", m + ["level"],
                                          buckets=(0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 4), registry=r)
        self.signal_up = Gauge("aim_controller_signal_up", "1 when a controller signal is available.",
                               m + ["signal"], registry=r)
        self.gpu_utilization = Gauge("aim_gpu_utilization_ratio", "Busiest GPU's utilisation (NVML; NaN without "
                                     "a GPU).", registry=r)
        self.gpu_memory = Gauge("aim_gpu_memory_used_ratio", "Fullest GPU's used memory fraction (NVML; NaN "
                                "without a GPU).", registry=r)

        g = ["grpc_type", "grpc_service", "grpc_method"]
        self.grpc_started = Counter("grpc_server_started_total", "RPCs started on the server.", g, registry=r)
        self.grpc_handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                                    g + ["grpc_code"], registry=r)
        self.grpc_received = Counter("grpc_server_msg_received_total", "Stream messages received.", g, registry=r)
        self.grpc_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent.", g, registry=r)
        self.grpc_seconds = Histogram("grpc_server_handling_seconds", "RPC handling time.", g,
                                      buckets=LATENCY_BUCKETS, registry=r)

    def watch_controller(self, model: str, controller) -> None:
        """Gauges read from the controller at scrape time."""
        nan = float("nan")
        self.controller_margin.controllers[model] = controller
        self.controller_levels.labels(model).set(len(controller.ladder))
        self.controller_p95.labels(model).set_function(
            lambda: nan if controller.status().p95_ratio is None else controller.status().p95_ratio)
        self.signal_up.labels(model, "nvml").set_function(lambda: float(controller.status().gpu_available))
        self.signal_up.labels(model, "prometheus").set_function(
            lambda: nan if controller.status().prometheus_up is None else float(controller.status().prometheus_up))

        def gpu(field):
            snap = controller.gpu.snapshot() if controller.gpu is not None else None
            value = getattr(snap, field) if snap is not None and snap.available else None
            return nan if value is None else value

        self.gpu_utilization.set_function(lambda: gpu("utilization"))
        self.gpu_memory.set_function(lambda: gpu("memory_used_fraction"))

    def watch_engine(self, model: str, runtime) -> None:
        """Batch and KV pool gauges, read from the runtime and its engine's pool at scrape time."""
        pool = runtime.engine.pool
        self.in_flight.labels(model).set_function(lambda: runtime.running)
        self.queue_depth.labels(model).set_function(lambda: runtime.waiting)
        self.kv_usage.labels(model).set_function(lambda: pool.used_blocks / pool.num_blocks)
        self.kv_reserved.labels(model).set_function(lambda: pool.reserved_blocks / pool.num_blocks)
        self.kv_used_bytes.labels(model).set_function(lambda: pool.used_blocks * pool.block_bytes)
        self.kv_capacity_bytes.labels(model).set(pool.capacity_bytes)
        self.batch_size.labels(model)
        cache = runtime.engine.feature_cache
        self.feature_cache_bytes.labels(model).set_function(lambda: cache.bytes if cache is not None else 0)
        self.feature_cache_capacity.labels(model).set(cache.capacity_bytes if cache is not None else 0)
        prefixes = runtime.engine.prefix_cache
        self.prefix_cache_bytes.labels(model).set_function(lambda: prefixes.bytes if prefixes is not None else 0)
        self.media_memory_bytes.labels(model).set_function(lambda: runtime.media_memory.used_bytes)

    def model_loaded(self, model: str) -> None:
        """Creates the per-model series at zero so dashboards and rate() see them before the first request."""
        for metric in (self.visual_in, self.visual_merged, self.flops_baseline, self.flops_actual, self.flops_reused,
                       self.feature_cache_hits, self.feature_cache_misses, self.feature_cache_evictions,
                       self.feature_cache_saved, self.prefix_cache_hits, self.prefix_cache_misses,
                       self.prefix_cache_evictions, self.prefix_cache_tokens):
            metric.labels(model)
        self.model_ready.labels(model).set(1)


class _MarginCollector:
    """aim_controller_margin per model and SLO class, read from the controllers at scrape time: each class has its
    own feedback loop, and classes appear as their requests do."""

    NAME = "aim_controller_margin"

    def __init__(self):
        self.controllers: dict = {}

    def describe(self):
        return [GaugeMetricFamily(self.NAME, "", labels=["model", "slo_class"])]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, "Safety margin the controller multiplies predicted latency by, per SLO "
                                   "class (each class has its own feedback loop).", labels=["model", "slo_class"])
        for model, controller in list(self.controllers.items()):
            for name, margin in controller.status().margins.items():
                family.add_metric([model, name], margin)
        yield family


def _nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)
