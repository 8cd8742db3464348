"""A soak of a running server (`aim-serve serve` in its own process, see tests/service/test_subprocess.py): many
independent callers on every wire (aim.v1 unary and streaming, the Open Inference Protocol, the OpenAI-compatible
HTTP API), with distinct and repeated images and videos, text-only prompts, mixed plans and answer lengths,
streams cancelled mid-answer and deadlines too tight to meet. Used by tests/service/test_soak.py (bounded) and
bench/soak.py (longer, with resident memory per round, docs/results/soak.json).

Every request must end as one of the outcomes a caller may see under load (answered, its deadline passed, it
cancelled itself, refused for load); anything else is a failure. Afterwards the server's books must balance:
nothing in flight or queued, the KV pool's used bytes are what the prefix cache holds, no decoded media held."""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from service.client import AimClient
from service.proto.inference import grpc_service_pb2 as kpb
from service.proto.inference import grpc_service_pb2_grpc as kgrpc
from tests.media_samples import encode_image, encode_video

WIRES = ("grpc", "grpc-stream", "grpc-stream-cancel", "oip", "http")
FINE = {"ok", "deadline_exceeded", "cancelled", "rejected"}  # what a caller may see under load


@dataclass
class SoakResult:
    outcomes: Counter = field(default_factory=Counter)  # (wire, outcome) -> count
    failures: list[str] = field(default_factory=list)  # unexpected outcomes, with what they said
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


class _Media:
    """The media a caller picks from: a few repeated items (cache hits across callers) and distinct ones."""

    def __init__(self):
        self.repeated_image = encode_image("PNG", size=(40, 56), seed=1)
        self.repeated_video = encode_video(frames=12)
        self._distinct = 0
        self._lock = threading.Lock()

    def distinct(self) -> int:
        with self._lock:
            self._distinct += 1
            return self._distinct

    def pick(self, rng: random.Random) -> tuple[list[bytes], list[bytes]]:
        """(images, videos) of one request."""
        kind = rng.choices(("text", "image", "new-image", "video", "new-video"), (2, 3, 3, 1, 1))[0]
        if kind == "image":
            return [self.repeated_image], []
        if kind == "new-image":
            return [encode_image("PNG", size=(rng.randint(16, 64), rng.randint(16, 64)), seed=self.distinct())], []
        if kind == "video":
            return [], [self.repeated_video]
        if kind == "new-video":
            return [], [encode_video(frames=rng.randint(6, 16), size=(32 + 16 * rng.randint(0, 2), 64))]
        return [], []


def _one(target: str, http_url: str, media: _Media, rng: random.Random, wires=WIRES) -> tuple[str, str, str]:
    """One request: (wire, outcome, detail)."""
    wire = rng.choice(wires)
    images, videos = media.pick(rng)
    tokens = rng.choice((2, 4, 8, 24))
    prompt = rng.choice(("Describe it.", "What colour is the square?", "Say something short.",
                         "List what you see, then explain why it matters."))
    plan = rng.choice(("auto", "none", "auto-tight"))
    tight = rng.random() < 0.15  # a deadline too short to be met
    try:
        if wire.startswith("grpc"):
            kwargs = dict(images=images, videos=videos, frames=8 if videos else 0, max_new_tokens=tokens,
                          no_reduction=plan == "none", slo_ms=200 if plan == "auto-tight" else 0)
            with AimClient(target, timeout=rng.uniform(0.05, 0.4) if tight else 120) as client:
                if wire == "grpc":
                    client.generate(prompt, **kwargs)
                else:
                    events = client.stream_events(prompt, **dict(kwargs, max_new_tokens=max(tokens, 8),
                                                                 ignore_eos=True))
                    for i, _ in enumerate(events):
                        if wire == "grpc-stream-cancel" and i >= rng.randint(0, 2):
                            events.cancel()
                            return wire, "cancelled", ""
            return wire, "ok", ""
        if wire == "oip":
            request = kpb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
                prompt.encode())
            if images:
                request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(images)
            if videos:
                request.inputs.add(name="video", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(videos)
            request.parameters["aim_max_new_tokens"].int64_param = tokens
            request.parameters["aim_reduction"].string_param = "none" if plan == "none" else "auto"
            with grpc.insecure_channel(target) as channel:
                kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=0.2 if tight else 120)
            return wire, "ok", ""
        return wire, *_http(http_url, prompt, images, videos, tokens, plan, rng)
    except grpc.RpcError as err:
        code = err.code()
        outcome = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded", grpc.StatusCode.CANCELLED: "cancelled",
                   grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected"}.get(code, code.name.lower())
        return wire, outcome, err.details() or ""


def _http(http_url: str, prompt: str, images: list[bytes], videos: list[bytes], tokens: int, plan: str,
          rng: random.Random) -> tuple[str, str]:
    import base64

    import openai

    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
               for i in images]
    content += [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(v).decode()}}
                for v in videos]
    content.append({"type": "text", "text": prompt})
    client = openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=120)
    try:
        if rng.random() < 0.5:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                           max_tokens=tokens, extra_body={"reduction": "none"} if plan == "none"
                                           else None)
        else:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                    max_tokens=tokens, stream=True)
            for _ in stream:
                pass
        return "ok", ""
    except openai.RateLimitError:
        return "rejected", ""
    except openai.APIStatusError as err:
        return f"http {err.status_code}", str(err)[:200]
    finally:
        client.close()


def run_soak(target: str, http_url: str, callers: int = 16, per_caller: int = 5, seed: int = 0,
             wires: tuple[str, ...] = WIRES) -> SoakResult:
    """`callers` independent callers (open loop: each sends its next request once its last one ended, after a
    random pause), `per_caller` requests each."""
    media, result, lock = _Media(), SoakResult(), threading.Lock()
    start = time.monotonic()

    def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(per_caller):
            time.sleep(rng.uniform(0, 0.05))
            wire, outcome, detail = _one(target, http_url, media, rng, wires)
            with lock:
                result.outcomes[(wire, outcome)] += 1
                if outcome not in FINE:
                    result.failures.append(f"{wire}: {outcome}: {detail}")

    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(caller, i) for i in range(callers)]:
            future.result()
    result.seconds = time.monotonic() - start
    return result


def server_books(metrics_url: str, model: str = "tiny") -> dict[str, float]:
    """The server's books, from its metrics: sequences in flight and queued, KV bytes used, prefix-cache bytes,
    decoded media held, feature-cache bytes (which grow with distinct media up to the cache's budget)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    wanted = {"aim_requests_in_flight": "in_flight", "aim_queue_depth": "queued", "aim_kv_cache_used_bytes": "kv_used",
              "aim_prefix_cache_bytes": "prefix_cache", "aim_media_memory_bytes": "media_memory",
              "aim_feature_cache_bytes": "feature_cache"}
    books = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted and f'model="{model}"' in rest:
            books[wanted[name]] = float(line.rsplit(" ", 1)[1])
    return books


def books_balance(books: dict[str, float]) -> bool:
    return (books.get("in_flight") == 0 and books.get("queued") == 0 and books.get("media_memory") == 0
            and books.get("kv_used") == books.get("prefix_cache"))
