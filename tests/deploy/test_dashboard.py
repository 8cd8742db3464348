"""The Grafana dashboard, proven against reality: it parses as a Grafana dashboard model, and every panel's
PromQL (template variables substituted) returns data from a real Prometheus scraping the real service."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from aim_engine import AimEngine
from service.client import AimClient
from service.settings import Settings
from tests.controller.test_prometheus import free_port, start_prometheus, target_up, wait_for
from tests.media_samples import encode_image, encode_video
from tests.service.conftest import HOLD_TOKENS, ServerThread, hold, wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/aim-serve.json"


def load():
    return json.loads(DASHBOARD.read_text())


def test_dashboard_parses_with_the_grafana_model_library():
    from grafana_foundation_sdk.models.dashboard import Dashboard

    raw = load()
    model = Dashboard.from_json(raw)
    assert model.title == raw["title"] and len(model.panels) == len(raw["panels"]) >= 15
    variables = {v["name"] for v in raw["templating"]["list"]}
    assert {"model", "instance", "datasource"} <= variables
    for panel in raw["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "$instance" in target["expr"], (panel["title"], target["expr"])


def query(url: str, expr: str) -> list:
    body = json.loads(urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                             timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scrapes(url: str, instance: str) -> int:
    """How many times Prometheus has scraped `instance` (one `up` sample per scrape)."""
    result = query(url, f'count_over_time(up{{instance="{instance}"}}[1h])')
    return int(float(result[0]["value"][1])) if result else 0


def test_every_panel_query_returns_data_from_the_real_service(tiny_engines, tmp_path):
    metrics_port = free_port()
    prometheus, url = start_prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    settings = Settings(models=["unused"], port=0, metrics_port=metrics_port, max_queue=0, max_batch=1,
                        max_new_tokens=HOLD_TOKENS, calibrate=1, min_slo_ms=1)  # a 1 ms SLO: a violation
    # the model with both caches, so their panels have data: the two auto requests share their video
    engine = AimEngine(tiny_engines["tiny-ov"].adapter, kv_cache_bytes=64 * 2**20, feature_cache_bytes=64 * 2**20,
                       prefix_cache_bytes=16 * 2**20)
    server = ServerThread(settings, {"tiny-ov": engine})
    try:
        wait_for(lambda: target_up(url), 60, "Prometheus to scrape the service")
        with AimClient(server.target) as client:
            video = encode_video(frames=16)
            client.generate("What moves?", videos=[video], frames=4, max_new_tokens=3, slo_ms=60_000)  # within SLO
            with pytest.raises(grpc.RpcError) as refused:  # a 1 ms SLO no level makes: refused at once, a violation
                client.generate("What moves?", videos=[video], frames=4, max_new_tokens=3, slo_ms=1)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.generate("Describe.", images=[encode_image("PNG")], max_new_tokens=3, no_reduction=True)
            # max_batch=1 and max_queue=0: while one request runs, another is rejected. The first is held (it runs
            # until cancelled) so that the two overlap.
            holder = hold(client, no_reduction=True)
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hi", videos=[video], frames=4, max_new_tokens=20)
            holder.cancel()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            wait_until(lambda: server.running.state.in_flight() == 0, "the held request to leave")

        instance = f"127.0.0.1:{metrics_port}"
        scrapes_after_traffic = scrapes(url, instance)
        dashboard = load()
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                expr = variable["query"]["query"].replace("$model", "tiny-ov")
                label = expr.split(",")[-1].strip(" )")
                series = expr[len("label_values("):expr.rindex(",")]
                wait_for(lambda: query(url, f"count by ({label}) ({series})"), 30, f"variable {variable['name']}")

        exprs = [(panel["title"], target["expr"].replace("$model", "tiny-ov").replace("$instance", instance)
                  .replace("$__rate_interval", "1m"))
                 for panel in dashboard["panels"] for target in panel["targets"]]
        wait_for(lambda: scrapes(url, instance) >= scrapes_after_traffic + 2, 30,
                 "two more scrapes after the last request")
        empty = []
        deadline = time.monotonic() + 30
        while True:
            empty = [(title, expr) for title, expr in exprs if not query(url, expr)]
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not empty, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
    finally:
        server.stop()
        prometheus.kill()
