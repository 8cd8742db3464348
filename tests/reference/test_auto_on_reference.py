"""`auto` on the real reference model, over a real server: after one request refused for an SLO no level makes, an
idle server gives default `auto` requests the full model, and its latency predictions come to match what requests
take (each stage's rate fitted from the requests' own work, answer lengths learnt from what the model generates)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

from aim_engine import AimEngine, ReductionPlan
from evaluation.datasets import synthetic_dataset
from reference_model.assemble import assemble
from aim_engine.request import ImagePart, TextPart, VideoPart
from service.client import AimClient
from service.plan_proto import plan_from_proto
from tests.service.conftest import BASE, ServerThread

REPO = Path(__file__).resolve().parents[2]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _mp4(frames) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"qmin": "1", "qmax": "3"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), "rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _call(item) -> tuple[str, dict]:
    """A dataset item as the client's arguments."""
    media = next(p for p in item.parts if isinstance(p, (ImagePart, VideoPart)))
    question = next(p.text for p in item.parts if isinstance(p, TextPart))
    if isinstance(media, ImagePart):
        return question, {"images": [_png(media.image)]}
    return question, {"videos": [_mp4(media.frames)], "frames": len(media.frames)}


@pytest.fixture(scope="module")
def reference_server():
    engine = AimEngine.load(assemble(REPO / "models" / "aim-reference"))
    server = ServerThread(replace(BASE, models=["reference"], max_queue=4), {"reference": engine})
    yield server
    server.stop()


def test_an_idle_server_gives_default_auto_requests_the_full_model(reference_server, monkeypatch):
    runtime = reference_server.running.state.runtimes["reference"]
    predictions = []  # (observed, forecast) seconds from each auto decision to its answer
    observe = runtime.observe

    def spy(done, sampling, slo_s, forecast_s=None):
        if done.applied.source == "auto" and forecast_s:
            predictions.append((done.total_s - done.media_s, forecast_s))
        return observe(done, sampling, slo_s, forecast_s)

    monkeypatch.setattr(runtime, "observe", spy)
    items = synthetic_dataset(4).items
    video = next(i for i in items if i.kind == "video")
    with AimClient(reference_server.target, timeout=600) as client:
        question, media = _call(video)
        with pytest.raises(grpc.RpcError) as refused:  # far over its 1 ms SLO at any level: refused at once
            client.generate(question, slo_ms=1, **media)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
        replies = []
        for item in (items * 3)[:20]:  # idle again: default auto requests, one after another
            question, media = _call(item)
            replies.append(client.generate(question, **media))
    full = [plan_from_proto(r.applied_plan.plan) == ReductionPlan() for r in replies]
    assert all(full[3:]), [r.applied_plan.reason for r in replies]  # all but the first few: the full model
    ratios = [observed / forecast for observed, forecast in predictions[-10:]]
    assert len(ratios) == 10 and all(0.5 <= r <= 2.0 for r in ratios), ratios
