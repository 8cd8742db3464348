"""The fault suite: a hostile user's corpus (tests/fault_corpus.py) against the server as users run it, each case
with the status and message it must get and a good request answered right after it; a fuzz test of the request
decoder that never sees INTERNAL; and the server's memory held to bounds through hundreds of bad and heavy
requests, the 1080p clip of 900 frames among them."""

from __future__ import annotations

import math
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.proto.aim.v1 import aim_service_pb2 as pb
from tests.fault_corpus import (GOOD_PROMPT, OK, SERVER_FLAGS, corpus, heavy_clip, http_corpus, http_server_flags,
                                request, rss_mib, send, send_http, text)
from tests.media_samples import encode_image, encode_video
from tests.service.test_subprocess import ServerProcess

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024)]

# Memory bounds (MiB) over the level before, measured on the 2-core CI machine with the tiny model (bench/faults.py,
# docs/operations.md "Limits and failure behaviour"): serving the 1080p clip raised the peak by 23-26 MiB (the old
# decoder converted all 900 frames: 5.6 GB); ~200 more bad and heavy requests left +22 to +27 MiB (service/allocator.py:
# without its two measures, ~+100 MiB a round of the corpus).
PEAK_BOUND_MIB = 100
RETAINED_BOUND_MIB = 60  # resident memory in use: the heaps' free bytes (aim_heap_free_bytes) not counted


def heap_free_mib(metrics_url: str) -> float:
    """The server's aim_heap_free_bytes, in MiB (0 where it reports NaN: no glibc, nothing to tell apart)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    value = float(re.search(r"^aim_heap_free_bytes (\S+)$", text, re.M)[1])
    return 0.0 if math.isnan(value) else value / (1 << 20)


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside") / "secret.png"


@pytest.fixture(scope="module")
def faulty(checkpoint_dir, media_dirs):
    server = ServerProcess(checkpoint_dir("llava_onevision", layers=6, image_size=64), *SERVER_FLAGS,
                           *http_server_flags(media_dirs[0]))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cases():
    return corpus()


def good_answer(channel) -> str:
    call = channel.unary_unary("/aim.v1.AimService/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                               response_deserializer=pb.GenerateResponse.FromString)
    return call(request(text(GOOD_PROMPT), tokens=3), timeout=120).text


def test_every_fault_gets_its_status_and_an_actionable_message_and_the_server_keeps_serving(faulty, cases):
    failures = []
    with grpc.insecure_channel(faulty.target, options=CHANNEL_OPTIONS) as channel:
        expected = good_answer(channel)
        for case in cases:
            code, details = send(channel, case)
            if code not in case.codes:
                failures.append(f"{case.name}: {code.name} (want {[c.name for c in case.codes]}): {details}")
            elif code != OK and (not details or "Traceback" in details or "Unexpected <class" in details):
                failures.append(f"{case.name}: unhelpful message {details!r}")
            elif case.message is not None and code != OK and case.message not in details:
                failures.append(f"{case.name}: message {details!r} lacks {case.message!r}")
            if good_answer(channel) != expected:
                failures.append(f"after {case.name}: the good request's answer changed")
    assert faulty.proc.poll() is None, "the server died"
    assert not failures, "\n".join(failures)


def test_every_http_fault_gets_its_status_and_message_and_the_server_keeps_serving(faulty, media_dirs):
    """The OpenAI-compatible API's share of the corpus: malformed JSON, wrong types, a huge body, bad data URLs,
    an unknown part type, file paths escaping the allowed directory (.. and a symlink), a remote URL."""
    failures = []
    with grpc.insecure_channel(faulty.target, options=CHANNEL_OPTIONS) as channel:
        expected = good_answer(channel)
        for case in http_corpus(*media_dirs):
            status, message = send_http(faulty.http_url, case)
            if status != case.status:
                failures.append(f"{case.name}: HTTP {status} ({message[:200]}), expected {case.status}")
            elif case.message and case.message not in message:
                failures.append(f"{case.name}: message {message[:200]!r} lacks {case.message!r}")
            elif "Traceback" in message:
                failures.append(f"{case.name}: a stack trace reached the client")
            if good_answer(channel) != expected:
                failures.append(f"after {case.name}: the good request's answer changed")
    assert faulty.proc.poll() is None, "the server died"
    assert not failures, "\n".join(failures)


def test_memory_stays_bounded_through_hundreds_of_bad_and_heavy_requests(faulty, cases):
    """The peak while serving the 1080p clip (900 frames, 8 sampled) and the resident memory after a few hundred
    bad and heavy requests stay within bounds of the level before."""
    pid = faulty.proc.pid
    heavy = next(c for c in cases if c.name.startswith("video: 1080p clip of 900 frames"))
    with grpc.insecure_channel(faulty.target, options=CHANNEL_OPTIONS) as channel:
        for case in cases:  # warm: every code path has run once, allocator pools exist
            send(channel, case)
        before, free_before = rss_mib(pid), heap_free_mib(faulty.metrics_url)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        assert send(channel, heavy)[0] == OK
        peak = rss_mib(pid, "VmHWM") - before
        for _ in range(3):
            for case in cases:
                send(channel, case)
        # what the requests left in use: the heaps' free bytes are the trimmer's (it gives them back past 64 MiB,
        # on a thread of its own, so whether it has yet when this reads is a race), not held by anything
        free_after = heap_free_mib(faulty.metrics_url)
        after = rss_mib(pid) - free_after - (before - free_before)
    print(f"\nserver RSS {before:.0f} MiB ({free_before:.0f} free in the heaps); 1080p clip peak +{peak:.0f} MiB; "
          f"after {3 * len(cases) + 1} requests +{after:.0f} MiB in use ({free_after:.0f} free in the heaps)")
    assert peak < PEAK_BOUND_MIB
    assert after < RETAINED_BOUND_MIB
    assert faulty.proc.poll() is None


# ---- fuzzing the request decoder (a real in-process server, tiny models) ----------------------------------------
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0, -1.0]))
MIMES = st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "video/mp4", "video/webm", "",
                         "text/plain", "image/PNG ", "video/x-matroska"])
MEDIA = st.one_of(st.binary(max_size=64), st.sampled_from([encode_image("PNG", size=(8, 8)),
                                                           encode_image("JPEG", size=(8, 8)),
                                                           encode_video(frames=4, size=(32, 32))]))
PART = st.one_of(
    st.builds(lambda t: pb.ContentPart(text=t), st.text(max_size=40)),
    st.builds(lambda d, m: pb.ContentPart(image=pb.Image(data=d, mime_type=m)), MEDIA, MIMES),
    st.builds(lambda d, m, n: pb.ContentPart(video=pb.Video(data=d, mime_type=m, num_frames=n)), MEDIA, MIMES,
              st.integers(0, 80)),
    st.builds(lambda ds, fps: pb.ContentPart(frames=pb.Frames(frames=[pb.Image(data=d, mime_type="image/png")
                                                                      for d in ds], fps=fps)),
              st.lists(MEDIA, max_size=3), st.floats(-5, 60, width=64)),
    st.just(pb.ContentPart()),
)
SAMPLING = st.builds(lambda n, t, p, stop, eos: pb.SamplingParams(max_new_tokens=n, temperature=t, top_p=p,
                                                                  stop=stop, ignore_eos=eos),
                     st.integers(0, 3), FLOATS, FLOATS, st.lists(st.text(max_size=3), max_size=2), st.booleans())
PLAN = st.builds(lambda mt, mr, ps, pe, imp, pos, red, stages: pb.ReductionPlan(
    merge_tokens=mt, merge_retention=mr, prune_start=ps, prune_end=pe, importance=imp, positions=pos, reducer=red,
    prune_stages=[pb.PruneStage(layer=layer, keep=keep) for layer, keep in stages]),
    st.integers(0, 40), FLOATS, st.integers(0, 12), st.integers(0, 12), st.integers(0, 5), st.integers(0, 4),
    st.integers(0, 5), st.lists(st.tuples(st.integers(0, 12), st.floats(allow_nan=True, width=64)), max_size=3))
REDUCTION = st.one_of(
    st.none(),
    st.builds(lambda p: pb.Reduction(plan=p), PLAN),
    st.just(pb.Reduction(none=pb.NoReduction())),
    st.builds(lambda slo, pri, floor: pb.Reduction(auto=pb.AutoBudget(latency_slo_ms=slo, priority=pri,
                                                                      min_retention=floor)),
              st.integers(0, 100_000), st.integers(0, 5), FLOATS),
)
REQUEST = st.builds(lambda model, parts, sampling, reduction, system: pb.GenerateRequest(
    model=model, parts=parts, sampling=sampling, reduction=reduction, system_prompt=system),
    st.sampled_from(["", "tiny-ov", "tiny-llava", "nope"]), st.lists(PART, max_size=4), SAMPLING, REDUCTION,
    st.text(max_size=20))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(message=REQUEST)
def test_the_request_decoder_never_answers_internal(server, message):
    with grpc.insecure_channel(server.target) as channel:
        code, details = send(channel, _Raw(message))
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details


class _Raw:
    """A case for `send`: the message as it is."""

    method = "Generate"

    def __init__(self, message):
        self.request = message


def test_the_heavy_clip_decodes_only_what_it_samples():
    """The clip of the issue: 900 frames of 1080p (the old decoder held every frame, 5.6 GB); 8 frames at the
    model's size come back, as the frames at their sampled indices."""
    from aim_engine.media import read_video, sample_frame_indices

    clip = read_video(heavy_clip(), "video/mp4", 8, frame_size=lambda w, h: (w // 10, h // 10))
    assert len(clip.frames) == 8 and {f.size for f in clip.frames} == {(192, 108)}
    # the box moves 2 px a frame: where it is tells which frame was decoded
    import numpy as np

    centres = [float(np.flatnonzero(np.asarray(f.convert("L"))[45] < 105).mean()) * 10 + 5 for f in clip.frames]
    expected = [(i * 2) % (1920 - 100) + 50 for i in sample_frame_indices(900, 8)]
    assert all(abs(c - e) <= 15 for c, e in zip(centres, expected)), (centres, expected)
    assert clip.fps == pytest.approx(8 / 30.0)
