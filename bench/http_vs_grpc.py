"""The same short-answer requests over gRPC (aim.v1) and over the OpenAI-compatible HTTP API, on one `aim-serve
serve` process, p50 and p95 of the client-side latency side by side. Writes docs/results/http-vs-grpc.json: rows
of {wire: "grpc" | "http", stream: bool, latency_p50_s, latency_p95_s, requests}.

    python bench/http_vs_grpc.py --model models/aim-reference

Closed loop, one request at a time, so each latency is one request's own (no queueing). Each request is an image
question (a distinct synthetic scene per request, a prompt drawn from several, an answer of 4 to 8 tokens, the
model's default plan, greedy) and is sent on all four (wire, stream) paths one after another in a shuffled order,
so drift and noise fall on every path alike. The caches are off: a path must not find what the one before it
computed. The `openai` client and the gRPC client each keep one connection, as a backend would. What this
favours: nothing queues, so the figures are the wire's own overhead on top of the same engine work; under load
the wires share the same runtime and batch.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_engine.plan import plan_to_dict  # noqa: E402
from service.client import AimClient  # noqa: E402
from service.plan_proto import plan_from_proto  # noqa: E402
from tests.service.test_subprocess import ServerProcess  # noqa: E402

PROMPTS = ["What colour is the shape?", "How many shapes are there?", "Which shape is it?",
           "Where is the shape?", "Name the colour of the largest shape.", "Is there a circle?"]


def scene(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (224, 224), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x, y, r = rng.randint(30, 190), rng.randint(30, 190), rng.randint(12, 28)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice([(220, 40, 40), (40, 40, 220), (20, 20, 20)]))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/aim-reference"))
    parser.add_argument("--requests", type=int, default=40, help="requests per path")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=str(ROOT / "docs/results/http-vs-grpc.json"))
    return parser.parse_args()


def main() -> None:
    args = _arguments()

    import openai

    # the caches off: a path must not find what the one before it computed
    server = ServerProcess(Path(args.model), "--http-port", "0", "--feature-cache-bytes", "0",
                           "--prefix-cache-bytes", "0")
    target, base_url = server.target, server.http_url
    latencies: dict[tuple[str, bool], list[float]] = {(w, s): [] for w in ("grpc", "http") for s in (False, True)}
    try:
        with AimClient(target, timeout=300) as grpc_client, \
                openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as http_client:
            plan = plan_from_proto(grpc_client.model_info().default_plan)
            rng = random.Random(args.seed)

            def run(wire: str, stream: bool, prompt: str, image: bytes, tokens: int) -> str:
                if wire == "grpc":
                    kwargs = dict(images=[image], max_new_tokens=tokens, plan=plan)
                    if stream:
                        return "".join(grpc_client.stream(prompt, **kwargs))
                    return grpc_client.generate(prompt, **kwargs).text
                url = "data:image/png;base64," + base64.b64encode(image).decode()
                kwargs = dict(model="tiny", max_tokens=tokens, temperature=0,
                              messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                     {"type": "text", "text": prompt}]}],
                              extra_body={"reduction": {"plan": plan_to_dict(plan)}})
                if stream:
                    return "".join(c.choices[0].delta.content or ""
                                   for c in http_client.chat.completions.create(stream=True, **kwargs) if c.choices)
                return http_client.chat.completions.create(**kwargs).choices[0].message.content

            for i in range(args.warmup + args.requests):
                prompt, image, tokens = rng.choice(PROMPTS), scene(args.seed * 100_000 + i), rng.randint(4, 8)
                paths = list(latencies)
                rng.shuffle(paths)
                answers = set()
                for wire, stream in paths:
                    t0 = time.perf_counter()
                    answers.add(run(wire, stream, prompt, image, tokens))
                    if i >= args.warmup:
                        latencies[(wire, stream)].append(time.perf_counter() - t0)
                if len(answers) != 1:
                    raise SystemExit(f"request {i}: the paths answered differently: {answers}")
    finally:
        server.stop()

    def p95(values: list[float]) -> float:
        return statistics.quantiles(values, n=20)[-1]

    rows = [{"wire": w, "stream": s, "latency_p50_s": round(statistics.median(v), 4),
             "latency_p95_s": round(p95(v), 4), "requests": len(v)} for (w, s), v in latencies.items()]
    for row in rows:
        print(f"{row['wire']:<5} stream={row['stream']!s:<5} p50 {row['latency_p50_s'] * 1000:7.1f} ms   "
              f"p95 {row['latency_p95_s'] * 1000:7.1f} ms   ({row['requests']} requests)")
    for stream in (False, True):
        g, h = (next(r for r in rows if r["wire"] == w and r["stream"] == stream) for w in ("grpc", "http"))
        print(f"stream={stream}: HTTP p50 / gRPC p50 = {h['latency_p50_s'] / g['latency_p50_s']:.3f}")
    Path(args.json_out).write_text(json.dumps({"command": "python bench/http_vs_grpc.py --model "
                                               "models/aim-reference", "model": Path(args.model).name,
                                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
