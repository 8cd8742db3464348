"""A bounded soak of `aim-serve serve` in its own process (tests/soak.py): 16 callers on every wire, with
cancels, tight deadlines, distinct and repeated media and mixed plans. Every request ends as a caller may see
under load, the server keeps serving, and afterwards its books balance. (bench/soak.py runs it longer and
records the resident memory per round.)"""

from __future__ import annotations

from service.client import AimClient
from tests.service.conftest import wait_until
from tests.service.test_subprocess import ServerProcess
from tests.soak import books_balance, run_soak, server_books


def test_sixteen_callers_on_every_wire_end_cleanly_and_leave_the_books_balanced(checkpoint_dir):
    server = ServerProcess(checkpoint_dir("llava_onevision", layers=4, image_size=64), "--http-port", "0",
                           "--calibrate", "0", "--max-queue", "16")
    try:
        result = run_soak(server.target, server.http_url, callers=16, per_caller=5, seed=0)
        assert not result.failures, "\n".join(result.failures)
        assert result.requests == 80
        seen = {wire for wire, _ in result.outcomes}
        assert seen == {"grpc", "grpc-stream", "grpc-stream-cancel", "oip", "http"}, result.outcomes
        assert sum(n for (_, outcome), n in result.outcomes.items() if outcome == "ok") >= 40, result.outcomes
        wait_until(lambda: books_balance(server_books(server.metrics_url)), "the server's books to balance")
        with AimClient(server.target) as client:
            assert client.generate("Still there?", max_new_tokens=2).usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0
