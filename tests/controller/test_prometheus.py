"""A real Prometheus (Debian package) scraping the real service on loopback; the controller reads the p95
back through PromQL and acts on it; Prometheus dies mid-run and nothing fails."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest

from service.client import AimClient
from service.metrics import SLO_RATIO_BUCKETS
from service.settings import Settings
from tests.media_samples import encode_image
from tests.service.conftest import ServerThread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(tmp_path, target: str):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is installed by scripts/setup.sh (Debian package prometheus)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                      f"  - job_name: aim\n    static_configs:\n      - targets: ['{target}']\n")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def target_up(url: str) -> bool:
    try:
        body = json.loads(urllib.request.urlopen(f"{url}/api/v1/targets", timeout=2).read())
    except OSError:
        return False
    return any(t["health"] == "up" for t in body["data"]["activeTargets"])


def test_controller_reads_p95_from_prometheus_and_falls_back_when_it_dies(tiny_engines, tmp_path):
    metrics_port = free_port()
    prometheus, url = start_prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    settings = Settings(models=["unused"], port=0, metrics_port=metrics_port, prometheus_url=url,
                        feedback_interval_s=0.5, default_slo_ms=20, calibrate=1)
    server = ServerThread(settings, {"tiny-ov": tiny_engines["tiny-ov"]})
    try:
        controller = server.running.state.runtimes["tiny-ov"].controller
        wait_for(lambda: target_up(url), 60, "Prometheus to scrape the service")
        with AimClient(server.target) as client:
            def traffic_and_source(expected: str):
                try:
                    client.generate("Describe.", images=[encode_image("PNG")], max_new_tokens=4)
                except grpc.RpcError as err:  # predicted past its 20 ms: rejected at once, a miss at its SLO
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                return controller.status().p95_source == expected

            # requests take far more than the 20 ms SLO (each rejected counts at its SLO, a ratio of 1 or more, in
            # buckets that PromQL interpolates): the p95 read back through PromQL must say so
            wait_for(lambda: traffic_and_source("prometheus"), 60, "a p95 from Prometheus")
            status = controller.status()
            local, _ = controller.window.quantile(0.95)
            # both p95 / 20 ms SLO; the histogram's cannot tell apart ratios past its last finite bucket, which a
            # request served before the rates were known reaches on a busy machine (1.5 s: 73)
            seen = min(local, SLO_RATIO_BUCKETS[-1])
            assert status.p95_ratio > 0.9 and 0.3 * seen <= status.p95_ratio <= 3 * seen
            wait_for(lambda: traffic_and_source("prometheus") and controller.feedback.margin > 1.2, 30,
                     "the margin to rise")
            # another SLO class: its own series in the same query, read for its own loop
            wait_for(lambda: client.generate("Describe.", images=[encode_image("PNG")], max_new_tokens=4,
                                             slo_ms=60_000) and controller.p95("60s")[1] == "prometheus", 60,
                     "the 60 s class's p95 from Prometheus")
            assert controller.p95("60s")[0] < 0.5 < 0.9 < controller.p95("default")[0]  # each class at its own SLO

            prometheus.kill()
            prometheus.wait(10)
            # every request still succeeds; once the last value is stale the window takes over
            wait_for(lambda: traffic_and_source("window"), 30, "the fallback to the local window")
            assert not controller.prometheus.latest().value
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'aim_controller_signal_up{model="tiny-ov",signal="prometheus"} 0.0' in body
        nvml_up = float(controller.gpu.available)  # the service's real NVML sampler: 0 without a GPU, 1 with one
        assert f'aim_controller_signal_up{{model="tiny-ov",signal="nvml"}} {nvml_up}' in body
        assert "aim_controller_margin" in body and 'aim_requests_total{model="tiny-ov",outcome="ok"}' in body
        assert 'outcome="internal"' not in body and 'model="-"' not in body
    finally:
        server.stop()
        if prometheus.poll() is None:
            prometheus.kill()
