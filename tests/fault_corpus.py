"""A corpus of bad, hostile and heavy requests, built here (nothing downloaded), with the status each must get.
Used by tests/service/test_faults.py and by bench/faults.py (which writes docs/results/faults.json)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import grpc

from grpc_health.v1 import health_pb2

from service.proto.aim.v1 import aim_service_pb2 as pb
from service.proto.inference import grpc_service_pb2 as kpb
from aim_engine.media import MediaLimits
from tests.media_samples import big_clip, bomb_png, encode_image, long_gop_clip, unusual_images, video_formats

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# The server flags the corpus expects (small limits, so each limit is reachable with small requests).
SERVER_FLAGS = ("--max-message-bytes", str(4 * 1024 * 1024), "--max-decoded-bytes", str(1_000_000),
                "--media-memory-bytes", str(8_000_000), "--calibrate", "0", "--max-queue", "64")
GOOD_PROMPT = "Describe it."


@dataclass(frozen=True)
class FaultCase:
    name: str
    request: object  # a GenerateRequest, or raw bytes sent as one
    codes: tuple  # acceptable status codes (most cases: exactly one)
    message: str | None = None  # a fragment the error's details must contain
    method: str = "Generate"  # a key of METHODS


def text(value: str) -> pb.ContentPart:
    return pb.ContentPart(text=value)


def image(data: bytes, mime: str) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data, mime_type=mime))


def video(data: bytes, mime: str, frames: int = 4) -> pb.ContentPart:
    return pb.ContentPart(video=pb.Video(data=data, mime_type=mime, num_frames=frames))


def request(*parts, tokens: int = 2, **fields) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", pb.SamplingParams(max_new_tokens=tokens))
    return pb.GenerateRequest(parts=list(parts) or [text(GOOD_PROMPT)], sampling=sampling, **fields)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, for messages the library would refuse to build."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += struct.pack("B", byte | (0x80 if value else 0))
        if not value:
            return out


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak since the last reset (VmHWM), MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@lru_cache(maxsize=1)
def heavy_clip() -> bytes:
    return big_clip()


def corpus() -> list[FaultCase]:
    cases: list[FaultCase] = []
    add = cases.append

    # ---- images: bombs, modes, animations, broken files, wrong types ----------------------------------------
    add(FaultCase("image: 48 MP decompression bomb in a few KB of PNG", request(image(bomb_png(), "image/png"),
                  text(GOOD_PROMPT)), (INVALID,), "48000000 pixels; the limit is"))
    for name, (data, mime) in unusual_images().items():
        add(FaultCase(f"image: {name}", request(image(data, mime), text(GOOD_PROMPT)), (OK,)))
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        data = encode_image(fmt, size=(48, 64))
        add(FaultCase(f"image: truncated {fmt}", request(image(data[: len(data) // 2], mime), text(GOOD_PROMPT)),
                      (INVALID,), "cannot decode"))
        garbage = data[:16] + bytes(range(256)) * 4
        add(FaultCase(f"image: {fmt} header then garbage", request(image(garbage, mime), text(GOOD_PROMPT)),
                      (INVALID,), "cannot decode"))
    add(FaultCase("image: PNG declared as JPEG", request(image(encode_image("PNG"), "image/jpeg"), text("Hi")),
                  (INVALID,), "declared type"))
    add(FaultCase("image: unsupported type", request(image(encode_image("PNG"), "application/octet-stream"),
                                                     text("Hi")), (INVALID,), "unsupported image type"))
    add(FaultCase("image: zero bytes", request(image(b"", "image/png"), text("Hi")), (INVALID,), "empty (0 bytes)"))

    # ---- videos: every container, broken, wrong types, limits ------------------------------------------------
    for name, (data, mime) in video_formats().items():
        add(FaultCase(f"video: {name}", request(video(data, mime), text(GOOD_PROMPT)), (OK,)))
        # what survives of a cut or damaged stream may still decode; either way it is answered or refused clearly
        add(FaultCase(f"video: truncated {name}", request(video(data[: len(data) // 3], mime), text("Hi")),
                      (OK, INVALID)))
        damaged = data[:64] + bytes(b ^ 0x5A for b in data[64:])
        add(FaultCase(f"video: damaged {name}", request(video(damaged, mime), text("Hi")), (OK, INVALID)))
    mp4 = video_formats()["mp4"][0]
    add(FaultCase("video: MP4 declared as PNG", request(image(mp4, "image/png"), text("Hi")), (INVALID,),
                  "cannot decode"))
    add(FaultCase("video: unsupported type", request(video(mp4, "video/x-flv"), text("Hi")), (INVALID,),
                  "unsupported video type"))
    add(FaultCase("video: zero bytes", request(video(b"", "video/mp4"), text("Hi")), (INVALID,), "empty (0 bytes)"))
    add(FaultCase("video: an empty frame list", request(pb.ContentPart(frames=pb.Frames()), text("Hi")), (INVALID,),
                  "empty list of frames"))
    add(FaultCase("video: 65 frames asked", request(video(mp4, "video/mp4", 65), text("Hi")), (INVALID,),
                  "limit is 64"))
    add(FaultCase("video: 1080p clip of 900 frames, 8 sampled", request(video(heavy_clip(), "video/mp4", 8),
                                                                        text(GOOD_PROMPT)), (OK,)))
    add(FaultCase("video: 1080p clip, 64 frames over the decoded-media limit",
                  request(video(heavy_clip(), "video/mp4", 64), text("Hi")), (INVALID,), "decoded-media limit"))
    # one keyframe: sampling decodes forward once, not from the start for every sampled frame; a clip whose one
    # pass passes the server's decoded-frame limit is refused before decoding
    add(FaultCase("long-gop-one-keyframe: 1500 frames, 16 sampled", request(video(long_gop_clip(1500), "video/mp4", 16),
                                                                          text(GOOD_PROMPT)), (OK,)))
    over = MediaLimits().max_decoded_frames * 6 // 5
    add(FaultCase(f"long-gop-over-the-decoded-frame-limit: {over} frames after one keyframe, 8 sampled",
                  request(video(long_gop_clip(over), "video/mp4", 8), text("Hi")), (INVALID,),
                  "decoded-frame limit"))

    # ---- sizes: parts, prompt, message -----------------------------------------------------------------------
    small_png = encode_image("PNG", size=(8, 8))
    add(FaultCase("request: 100 images", request(*[image(small_png, "image/png")] * 100, text("Hi")), (INVALID,),
                  "100 images and videos; the limit is 64"))
    add(FaultCase("request: 5000 text parts", request(*[text("hi")] * 5000), (INVALID,), "the model's context is"))
    add(FaultCase("request: a prompt of 1 MB", request(text("word " * 200_000)), (INVALID,),
                  "the model's context is"))
    add(FaultCase("request: a message over the size limit", request(image(b"\x89PNG" + b"\0" * (5 * 1024 * 1024),
                                                                         "image/png"), text("Hi")),
                  (grpc.StatusCode.RESOURCE_EXHAUSTED,), "larger than max"))
    add(FaultCase("request: no parts", pb.GenerateRequest(), (INVALID,), "parts is empty"))

    # ---- bytes no client library would send ------------------------------------------------------------------
    add(FaultCase("wire: text that is not UTF-8", _field(2, _field(1, b"caf\xe9 \xff\xfe")), (INVALID,),
                  "not a valid"))
    add(FaultCase("wire: garbage bytes", b"\xff\xff\xff\xff\x0f\x12", (INVALID,), "not a valid"))

    # ---- numbers ---------------------------------------------------------------------------------------------
    nan, inf = float("nan"), float("inf")
    for name, sampling, fragment in [
        ("NaN temperature", pb.SamplingParams(max_new_tokens=2, temperature=nan), "temperature"),
        ("infinite temperature", pb.SamplingParams(max_new_tokens=2, temperature=inf), "temperature"),
        ("negative temperature", pb.SamplingParams(max_new_tokens=2, temperature=-0.5), "temperature"),
        ("NaN top_p", pb.SamplingParams(max_new_tokens=2, temperature=1, top_p=nan), "top_p"),
        ("negative top_p", pb.SamplingParams(max_new_tokens=2, temperature=1, top_p=-1), "top_p"),
        ("an empty stop string", pb.SamplingParams(max_new_tokens=2, stop=[""]), "stop strings"),
        ("too many new tokens", pb.SamplingParams(max_new_tokens=10**6), "exceeds the limit"),
    ]:
        add(FaultCase(f"sampling: {name}", request(text("Hi"), sampling=sampling), (INVALID,), fragment))
    for name, reduction, fragment in [
        ("NaN merge_retention", pb.Reduction(plan=pb.ReductionPlan(merge_retention=nan)), "merge_retention"),
        ("negative merge_retention", pb.Reduction(plan=pb.ReductionPlan(merge_retention=-0.5)), "merge_retention"),
        ("NaN prune keep", pb.Reduction(plan=pb.ReductionPlan(prune_stages=[pb.PruneStage(layer=2, keep=nan)])),
         "keep"),
        ("NaN min_retention", pb.Reduction(auto=pb.AutoBudget(min_retention=nan)), "min_retention"),
        ("an SLO below the server's minimum (1 ms)", pb.Reduction(auto=pb.AutoBudget(latency_slo_ms=1)),
         "below this server's minimum of 50 ms"),
    ]:
        add(FaultCase(f"plan: {name}", request(text("Hi"), reduction=reduction), (INVALID,), fragment))
    add(FaultCase("video: negative frame rate", request(pb.ContentPart(frames=pb.Frames(
        frames=[pb.Image(data=small_png, mime_type="image/png")], fps=-2)), text("Hi")), (INVALID,), "fps"))
    add(FaultCase("model: unknown", request(text("Hi"), model="gpt-9"), (grpc.StatusCode.NOT_FOUND,),
                  "unknown model 'gpt-9'"))
    # ---- stop strings: checked at every token on the engine's thread, so bounded in count and length -----------
    add(FaultCase("stop-strings-too-many: 50,000 of 40 characters", request(text("Hi"), sampling=pb.SamplingParams(
        max_new_tokens=2, stop=[f"{i:040d}" for i in range(50_000)])), (INVALID,), "stop strings; the limit is 16"))
    add(FaultCase("stop-strings-too-long: one of 100,000 characters", request(text("Hi"), sampling=pb.SamplingParams(
        max_new_tokens=2, stop=["x" * 100_000])), (INVALID,), "characters; the limit is 256"))

    # ---- media memory: a request reserves its whole decoded need (from the headers) before decoding any of it ----
    square = encode_image("PNG", size=(200, 200))  # 120,000 bytes decoded
    add(FaultCase("media-memory-several-images: 8 of 200x200, within the request's limit",
                  request(*[image(square, "image/png")] * 8, text(GOOD_PROMPT)), (OK,)))
    add(FaultCase("media-memory-over-the-request-limit: 10 of 200x200, refused from their headers",
                  request(*[image(square, "image/png")] * 10, text(GOOD_PROMPT)), (INVALID,), "decoded-media limit"))

    # ---- pruning scorers on a long prompt: their attention probabilities are held in blocks under a budget -----
    long_text = text("word " * 700)  # ~3500 tokens of the tiny model, within its 4096 positions
    for importance, name in ((pb.IMPORTANCE_PAGERANK, "pagerank"), (pb.IMPORTANCE_TEXT, "text"),
                             (pb.IMPORTANCE_LAST_TOKEN, "last-token")):
        add(FaultCase(f"pagerank-long-prompt: {name} importance over a 3500-token prompt", request(
            image(small_png, "image/png"), long_text, reduction=pb.Reduction(plan=pb.ReductionPlan(
                merge_retention=0.5, prune_start=1, prune_end=3, importance=importance))), (OK,)))

    # ---- the Open Inference Protocol's parameters ------------------------------------------------------------
    def infer(**params) -> kpb.ModelInferRequest:
        req = kpb.ModelInferRequest()
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
        for name, value in {"aim_max_new_tokens": 2, **params}.items():
            field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
            setattr(req.parameters[name], field, value)
        return req

    add(FaultCase("oip-good-request: a prompt answered", infer(), (OK,), method="ModelInfer"))
    add(FaultCase("oip-malformed-aim-stop: a JSON list cut short", infer(aim_stop="[1, 2"), (INVALID,),
                  "neither a stop string nor a JSON list", method="ModelInfer"))
    add(FaultCase("oip-too-many-stop-strings: a JSON list of 1000", infer(aim_stop=json.dumps(
        [f"s{i}" for i in range(1000)])), (INVALID,), "stop strings; the limit is 16", method="ModelInfer"))
    add(FaultCase("oip-min-retention-out-of-range: 2.0", infer(aim_min_retention=2.0), (INVALID,), "min_retention",
                  method="ModelInfer"))
    add(FaultCase("oip-negative-slo: -5 ms", infer(aim_slo_ms=-5), (INVALID,), "slo", method="ModelInfer"))
    add(FaultCase("oip-slo-below-minimum: 1 ms", infer(aim_slo_ms=1), (INVALID,), "below this server's minimum",
                  method="ModelInfer"))

    # ---- health: Watch streams (it answered UNKNOWN: "'coroutine' object is not iterable") ---------------------
    add(FaultCase("health-watch-first-status: SERVING", health_pb2.HealthCheckRequest(), (OK,), method="Watch"))

    add(FaultCase("estimate: a decompression bomb", pb.EstimateCostRequest(
        parts=[image(bomb_png(), "image/png"), text("Hi")]), (INVALID,), "pixels; the limit is", "EstimateCost"))
    return cases


# ---- the OpenAI-compatible HTTP API ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpFaultCase:
    name: str
    body: bytes  # sent as it is to POST /v1/chat/completions
    status: int  # the HTTP status it must get
    message: str | None = None  # a fragment the error object's message must contain
    declared_only: bool = False  # send the headers (its Content-Length) and not the body: refused from them alone


def http_server_flags(media_dir: Path) -> tuple[str, ...]:
    """The HTTP API on a free port, with `media_dir` the one directory file:// URLs may name."""
    return ("--http-port", "0", "--allowed-local-media-path", str(media_dir))


def http_corpus(media_dir: Path, outside: Path) -> list[HttpFaultCase]:
    """`media_dir` (the allowed directory) gets a good image and a symlink to `outside`, a file beyond it."""
    import base64
    import json
    import os

    (media_dir / "ok.png").write_bytes(encode_image("PNG"))
    outside.write_bytes(encode_image("PNG"))
    link = media_dir / "escape.png"
    if not link.is_symlink():
        os.symlink(outside, link)

    def chat(*parts, **fields) -> bytes:
        content = list(parts) + [{"type": "text", "text": GOOD_PROMPT}]
        return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                           **fields}).encode()

    def image_url(url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url}}

    png = base64.b64encode(encode_image("PNG")).decode()
    return [
        HttpFaultCase("http: a good image by data URL", chat(image_url(f"data:image/png;base64,{png}")), 200),
        HttpFaultCase("http: malformed JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        HttpFaultCase("http: a JSON array, not an object", b"[]", 400, "must be a JSON object"),
        HttpFaultCase("http: wrong type, max_tokens as a string", chat(max_tokens="2"), 400,
                      "max_tokens must be an integer"),
        HttpFaultCase("http: wrong type, messages as a string", b'{"model": "tiny", "messages": "Hi"}', 400,
                      "messages must be a non-empty list"),
        HttpFaultCase("http: wrong type, temperature as a string", chat(temperature="hot"), 400,
                      "temperature must be a number"),
        HttpFaultCase("http: a huge body", b" " * (4 * 1024 * 1024 + 1), 413, "the limit is", declared_only=True),
        HttpFaultCase("http: a data URL without base64", chat(image_url("data:image/png,abc")), 400,
                      "not a base64 data URL"),
        HttpFaultCase("http: a data URL with invalid base64", chat(image_url("data:image/png;base64,@@@@")), 400,
                      "invalid base64"),
        HttpFaultCase("http: a data URL of bytes that are no image", chat(image_url(
            "data:image/png;base64," + base64.b64encode(b"no image here").decode())), 400, None),
        HttpFaultCase("http: an unknown part type", chat({"type": "input_audio", "input_audio": {}}), 400,
                      "type 'input_audio'"),
        HttpFaultCase("http: a file path outside the allowed directory", chat(image_url("file:///etc/passwd")), 400,
                      "outside the allowed media directory"),
        HttpFaultCase("http: a file path escaping by ..", chat(image_url(
            f"file://{media_dir}/../{outside.parent.name}/{outside.name}")), 400,
            "outside the allowed media directory"),
        HttpFaultCase("http: a file path escaping by a symlink", chat(image_url(f"file://{link}")), 400,
                      "outside the allowed media directory"),
        HttpFaultCase("http: a file under the allowed directory", chat(image_url(f"file://{media_dir}/ok.png")), 200),
        HttpFaultCase("http: a remote URL not allowed", chat(image_url("http://169.254.169.254/latest/meta-data")),
                      400, "remote media URLs are off"),
        HttpFaultCase("http: an unknown model", json.dumps({"model": "gpt-9", "messages": [
            {"role": "user", "content": "Hi"}]}).encode(), 404, "unknown model 'gpt-9'"),
        HttpFaultCase("http: n > 1", chat(n=3), 400, "n is not supported"),
        HttpFaultCase("http: an SLO below the server's minimum (1 ms)", chat(reduction={"auto": {"slo_ms": 1}}), 400,
                      "below this server's minimum of 50 ms"),
        HttpFaultCase("http: stop-strings-too-many, 1000", chat(stop=[f"s{i}" for i in range(1000)]), 400,
                      "stop strings; the limit is 16"),
    ]


def send_http(base_url: str, case: HttpFaultCase, timeout: float = 120.0) -> tuple[int, str]:
    """(HTTP status, the error object's message, or "" for a 200) of one case."""
    return post_json(base_url, case.body, timeout, declared_only=case.declared_only)


def post_json(base_url: str, body: bytes, timeout: float = 120.0, declared_only: bool = False) -> tuple[int, str]:
    """POST /chat/completions: (status, the error object's message or ""). `declared_only`: the headers alone,
    so that a body the server refuses by its Content-Length is not cut off mid-send (a broken pipe, not a reply)."""
    import http.client
    import json
    import urllib.parse

    url = urllib.parse.urlparse(f"{base_url}/chat/completions")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.putrequest("POST", url.path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if not declared_only:
            conn.send(body)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status == 200:
        return 200, ""
    try:
        return response.status, json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.status, "(not an OpenAI error object)"


METHODS = {  # a case's method: (its path, its response type, whether it streams responses)
    "Generate": ("/aim.v1.AimService/Generate", pb.GenerateResponse, False),
    "EstimateCost": ("/aim.v1.AimService/EstimateCost", pb.EstimateCostResponse, False),
    "ModelInfer": ("/inference.GRPCInferenceService/ModelInfer", kpb.ModelInferResponse, False),
    "Watch": ("/grpc.health.v1.Health/Watch", health_pb2.HealthCheckResponse, True),
}


def send(channel: grpc.Channel, case: FaultCase, timeout: float = 120.0) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one case, sent as raw bytes so that malformed messages reach the server. A streaming
    method's case is OK once its first response arrives (the stream is then cancelled)."""
    path, response, streams = METHODS[case.method]
    payload = case.request if isinstance(case.request, bytes) else case.request.SerializeToString()
    try:
        if streams:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=response.FromString)
            replies = call(payload, timeout=timeout)
            next(replies)
            replies.cancel()
        else:
            channel.unary_unary(path, request_serializer=None, response_deserializer=response.FromString)(
                payload, timeout=timeout)
        return OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
