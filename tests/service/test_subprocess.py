"""The server as users run it: `aim-serve serve` in its own process. Open Inference Protocol interop with the
real tritonclient, SIGTERM draining, and the Prometheus exposition checked by promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from service.client import AimClient
from tests.media_samples import encode_image, encode_video

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    def __init__(self, model_dir: Path, *flags: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--model", f"tiny={model_dir}", "--port", "0",
             "--metrics-port", "0", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"listening on ([\d.]+):(\d+); metrics on (http://\S+)", line)
            if match:
                self.target, self.metrics_url = f"{match[1]}:{match[2]}", match[3]
                api = re.search(r"OpenAI-compatible API on (http://[^\s)]+)", line)
                self.http_url = api[1] if api else None
                return
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def model_dir(checkpoint_dir):
    return checkpoint_dir("llava_onevision", layers=6, image_size=64)


@pytest.fixture(scope="module")
def served(model_dir):
    server = ServerProcess(model_dir)
    yield server
    server.stop()


def test_tritonclient_interop(served, tmp_path):
    image, video = tmp_path / "a.png", tmp_path / "v.mp4"
    image.write_bytes(encode_image("PNG"))
    video.write_bytes(encode_video(frames=16))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/service/scripts/triton_client.py"), served.target,
                           "tiny", str(image), str(video)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["model_ready"] and not seen["unknown_model_ready"]
    assert seen["server"]["name"] == "aim-serve"
    assert seen["inputs"] == ["text_input", "image", "video"] and seen["outputs"] == ["text_output"]
    p = seen["infer_params"]
    assert p["aim_visual_tokens_in"] == 4 * 16 + 1 and p["aim_visual_tokens_merged"] == 4 * 4 + 1
    assert 0 < p["aim_prefill_flops"] < p["aim_baseline_prefill_flops"] and p["aim_plan_source"] == "explicit"
    assert p["aim_plan"].endswith("original positions, proportional attention")
    assert p["aim_completion_tokens"] >= 1
    assert seen["image_plan"] == "none"
    assert seen["bad_plan_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "merge_retention must be in" in seen["bad_plan_error"]["message"]
    assert "stream_error" not in seen
    final = seen["stream_final"]
    assert final["aim_finish_reason"] in ("length", "stop") and final["aim_completion_tokens"] >= 1
    assert seen["stream_deltas"] and "unknown model 'nope'" in seen["stream_unknown_model_error"]


def test_metrics_exposition_passes_promtool(served):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/test.sh (Debian package prometheus)"
    with AimClient(served.target) as client:
        client.generate("Hi", videos=[encode_video()], frames=4, max_new_tokens=3)
    text = urllib.request.urlopen(served.metrics_url, timeout=10).read()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    body = text.decode()
    for name in ("aim_requests_total", "aim_request_duration_seconds_bucket", "aim_llm_prefill_flops_total",
                 "aim_llm_prefill_flops_baseline_total", "aim_visual_tokens_in_total", "aim_queue_depth",
                 "aim_requests_in_flight", "aim_time_to_first_token_seconds_bucket",
                 "aim_time_per_output_token_seconds_bucket", "aim_visual_token_retention_ratio_bucket",
                 "grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                 "grpc_server_msg_sent_total"):
        assert name in body, name
    assert re.search(r'grpc_server_handled_total\{grpc_code="OK",grpc_method="Generate",'
                     r'grpc_service="aim.v1.AimService",grpc_type="unary"\} [1-9]', body)


def test_sigterm_drains_in_flight_requests_then_exits(model_dir):
    server = ServerProcess(model_dir, "--drain-seconds", "60")
    try:
        with AimClient(server.target) as client:
            events = client.stream_events("Keep talking.", videos=[encode_video()], frames=4, max_new_tokens=300,
                                          no_reduction=True)
            first = next(events)  # the request is running
            server.proc.send_signal(signal.SIGTERM)
            rest = list(events)  # ... and still finishes
            assert first.HasField("text_delta") or first.HasField("result")
            assert rest and rest[-1].HasField("result") and rest[-1].result.usage.completion_tokens >= 1
        assert server.proc.wait(30) == 0
        with AimClient(server.target, timeout=5) as client, pytest.raises(grpc.RpcError) as err:
            client.generate("Hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


def test_cli_client_with_the_models_default_plan(served, tmp_path):
    """What the quickstart's demo runs: `aim-serve stream ... --aim-default`: the answer, then a summary a person
    reads; with --json, one JSON object a line, the last one the whole response."""
    video = tmp_path / "v.mp4"
    video.write_bytes(encode_video(frames=16))
    argv = ["stream", "--target", served.target, "--video", str(video), "--frames", "4", "--prompt", "Where?",
            "--max-new-tokens", "3", "--aim-default"]
    readable = _cli(*argv)
    assert readable.returncode == 0 and readable.stderr == "", readable.stderr
    lines = readable.stdout.splitlines()
    plan_line = next(line for line in lines if "plan: " in line)
    assert plan_line.startswith("[") and "merge→0.25" in plan_line
    assert plan_line.endswith("(explicit: the request gave the plan)")
    tokens_line = next(line for line in lines if line.startswith("visual tokens: "))
    tokens = [int(word) for word in tokens_line.replace(",", " ").split() if word.isdigit()]
    assert tokens[0] > tokens[1] >= tokens[2]  # in -> after merging -> at the last layer
    assert any(line.startswith("LLM prefill: ") and "% saved" in line for line in lines)
    assert any(line.startswith("time (ms): queue ") for line in lines)

    events = [json.loads(line) for line in _cli(*argv, "--json").stdout.splitlines()]
    assert all("text_delta" in e for e in events[:-1]) and "result" in events[-1]
    result = events[-1]["result"]
    assert result["text"] == "".join(e["text_delta"] for e in events[:-1])
    assert result["applied_plan"]["source"] == "PLAN_SOURCE_EXPLICIT"
    assert result["applied_plan"]["plan"]["merge_retention"] == 0.25
    assert result["usage"]["visual_tokens_merged"] < result["usage"]["visual_tokens_in"]

    bad = _cli("generate", "--target", served.target, "--model", "nope", timeout=60)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("argv,message", [
    (["--image", "/nonexistent.png"], "argument --image: no such file: '/nonexistent.png'"),
    (["--video", "/"], "argument --video: '/' is a directory, not a file"),
    (["--frames", "-1"], "argument --frames: -1 is out of range: must be >= 0"),
    (["--temperature", "nan"], "argument --temperature: nan is out of range: must be >= 0"),
    (["--merge-retention", "1.5"], "argument --merge-retention: 1.5 is out of range: must be > 0 and <= 1"),
    (["--max-new-tokens", "ten"], "argument --max-new-tokens: 'ten' is not an integer"),
    (["--importance", "text"], "error: --importance only say how to reduce"),
    (["--prune", "5", "3"], "error: "),
])
def test_what_a_user_can_type_wrong_gets_one_line_naming_the_flag_and_value(served, argv, message):
    proc = _cli("generate", "--target", served.target, *argv, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_unreadable_file_is_named(served, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    path = tmp_path / "a.png" / "b.png"  # a file's path used as a directory: unreadable even for root
    proc = _cli("generate", "--target", served.target, "--image", str(path), timeout=60)
    assert proc.returncode == 2 and f"argument --image: cannot read '{path}': Not a directory" in proc.stderr


def test_health_command_for_container_probes(served):
    def run(*argv):
        return _cli("health", *argv, timeout=60)

    ok = run("--target", served.target)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    down = run("--target", "127.0.0.1:9", "--timeout", "1")  # nothing listens there
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_the_client_commands_need_only_the_client_install(served, tmp_path):
    """With every module of the server and reference extras absent, the client commands work against a real
    server, and the commands that need them say which extra to install."""
    from cli.main import _EXTRA_OF

    image = tmp_path / "a.png"
    image.write_bytes(encode_image("PNG"))

    def run(*argv):
        return subprocess.run([sys.executable, str(ROOT / "tests/service/scripts/without_server_packages.py"), *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), AIM_BLOCKED_MODULES=",".join(_EXTRA_OF)))

    target = ["--target", served.target]
    for argv in (["health", *target], ["info", *target], ["estimate", *target, "--image", str(image)],
                 ["generate", *target, "--image", str(image), "--max-new-tokens", "2", "--merge-retention", "0.5"],
                 ["stream", *target, "--image", str(image), "--max-new-tokens", "2", "--json"]):
        proc = run(*argv)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)
    for argv, extra in ((["serve", "--model", "m"], "server"), (["ask", "--model", "m", "--prompt", "p"], "server"),
                        (["build-reference", "--out", str(tmp_path / "r")], "reference")):
        proc = run(*argv)
        assert proc.returncode == 2 and f"pip install 'aim-serve[{extra}]'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
