"""The OpenAI-compatible HTTP API, called by the real `openai` client against a real server on loopback (uvicorn
in the gRPC server's event loop, over the same runtimes): answers, streams, media by data URL, conversations,
every budget choice, the usage extension, every error class as the client's own exception type, the same tokens
as gRPC, and sequences freed when a client leaves."""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import httpx
import openai
import pytest

from aim_engine import AimEngine, GenerationRequest, TextPart
from aim_engine.request import ImagePart
from service.client import AimClient
from service.proto.inference import grpc_service_pb2 as kserve_pb
from service.proto.inference import grpc_service_pb2_grpc as kserve_grpc
from service.server import start_listening
from tests.fault_corpus import post_json
from tests.media_samples import encode_image, encode_video
from tests.service.conftest import BASE, HOLD_TOKENS, ServerThread, hold, metric_value, wait_until

IMAGE = encode_image("PNG")
VIDEO = encode_video(frames=16)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes = IMAGE, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def video_part(data: bytes = VIDEO) -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def http_server(checkpoint_dir, tmp_path_factory):
    """Engines of its own: a server that stops closes its engines' loops, and make_server's share tiny_engines."""
    media_dir = tmp_path_factory.mktemp("media")
    (media_dir / "a.png").write_bytes(IMAGE)
    engines = {"tiny-ov": AimEngine.load(checkpoint_dir("llava_onevision", layers=6, image_size=64)),
               "tiny-llava": AimEngine.load(checkpoint_dir("llava"))}
    srv = ServerThread(replace(BASE, http_port=0, allowed_local_media_path=str(media_dir)), engines)
    srv.media_dir = media_dir
    srv.base_url = f"http://127.0.0.1:{srv.running.http_port}/v1"
    yield srv
    srv.stop()


@pytest.fixture
def oai(http_server):
    with openai.OpenAI(base_url=http_server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def running(srv, model: str = "tiny-ov") -> int:
    return srv.running.state.runtimes[model].running


def in_system(srv) -> int:
    return srv.running.state.in_flight()


# ---- answers ------------------------------------------------------------------------------------------------
def test_a_plain_answer_with_usage_and_the_aim_extension(oai):
    reply = oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "What is it?"},
                                                                       image_part()),
                                        max_tokens=6, temperature=0, extra_body={"reduction": "none"})
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "tiny-ov"
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 1 <= usage.completion_tokens <= 6
    aim = usage.aim
    assert aim["plan_source"] == "none" and aim["visual_tokens_in"] == aim["visual_tokens_merged"] > 0
    assert aim["prefill_flops"] == aim["prefill_flops_baseline"] > 0 and aim["plan_description"] == "none"
    assert aim["feature_cache_misses"] + aim["feature_cache_hits"] <= 1 and "prefix_tokens_reused" in aim


def test_the_same_request_over_http_and_grpc_gives_the_same_tokens(oai, http_server):
    for media, part in (({"images": [IMAGE]}, image_part()), ({"videos": [VIDEO], "frames": 4}, video_part())):
        extra = {"reduction": {"plan": {"merge_retention": 0.5, "prune_start": 2, "prune_end": 5}}}
        if "frames" in media:
            extra["media_io_kwargs"] = {"video": {"num_frames": 4}}
        http = oai.chat.completions.create(model="tiny-ov", temperature=0, max_tokens=10, extra_body=extra,
                                           messages=[{"role": "system", "content": "Be brief."},
                                                     *user(part, {"type": "text", "text": "Describe it."})])
        with AimClient(http_server.target) as client:
            grpc_reply = client.generate("Describe it.", max_new_tokens=10, system_prompt="Be brief.",
                                         plan=_plan(extra), **media)
        assert http.choices[0].message.content == grpc_reply.text
        assert http.usage.completion_tokens == grpc_reply.usage.completion_tokens
        assert http.usage.prompt_tokens == grpc_reply.usage.prompt_tokens
        assert http.usage.aim["visual_tokens_per_layer"] == list(grpc_reply.usage.visual_tokens_per_layer)


def _plan(extra):
    from aim_engine import ReductionPlan

    return ReductionPlan(**extra["reduction"]["plan"])


def test_a_streamed_answer_read_with_the_clients_iterator_matches_the_unary_one(oai):
    kwargs = dict(model="tiny-ov", messages=user({"type": "text", "text": "Tell me more."}), max_tokens=12,
                  temperature=0, extra_body={"reduction": "none"})
    unary = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].usage.aim["plan_source"] == "none"
    plain = list(oai.chat.completions.create(stream=True, **kwargs))
    assert all(c.usage is None for c in plain)  # usage only when asked for


def test_the_raw_stream_is_server_sent_events_ending_in_done(http_server):
    body = {"model": "tiny-ov", "messages": user({"type": "text", "text": "Hi"}), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{http_server.base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_an_image_and_a_video_by_data_url_with_frames_per_request(oai):
    reply = oai.chat.completions.create(model="tiny-ov", max_tokens=2, extra_body={
        "reduction": "none", "media_io_kwargs": {"video": {"num_frames": 4}}},
        messages=user(video_part(), {"type": "text", "text": "What moves?"}))
    assert reply.usage.aim["visual_tokens_in"] == 4 * 16 + 1  # 4 frames of 16 tokens and the newline
    jpeg = oai.chat.completions.create(model="tiny-llava", max_tokens=2, extra_body={"reduction": "none"},
                                       messages=user(image_part(encode_image("JPEG"), "image/jpeg"),
                                                     {"type": "text", "text": "And this?"}))
    assert jpeg.usage.aim["visual_tokens_in"] > 0


def test_a_file_url_under_the_allowed_directory_is_read(oai, http_server):
    url = f"file://{http_server.media_dir / 'a.png'}"
    reply = oai.chat.completions.create(model="tiny-ov", max_tokens=2, extra_body={"reduction": "none"},
                                        messages=user({"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Hi"}))
    assert reply.usage.aim["visual_tokens_in"] > 0


def test_a_conversation_is_rendered_through_the_models_chat_template(oai, http_server):
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [image_part(), {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": "A picture of noise."},
             {"role": "user", "content": "What colour is it?"}]
    reply = oai.chat.completions.create(model="tiny-llava", messages=turns, max_tokens=3, temperature=0,
                                        extra_body={"reduction": "none"})
    preparer = http_server.running.state.runtimes["tiny-llava"].engine.preparer
    from tests.conftest import random_image

    request = GenerationRequest([ImagePart(image=random_image(0)), TextPart("What is it?"),
                                 TextPart("A picture of noise."), TextPart("What colour is it?")],
                                system="Be brief.", turns=(("user", 2), ("assistant", 1), ("user", 1)))
    prompt = preparer.render_prompt(request)
    assert prompt.index("What is it?") < prompt.index("A picture of noise.") < prompt.index("What colour is it?")
    single = oai.chat.completions.create(model="tiny-llava", messages=[turns[0], turns[1]], max_tokens=3,
                                         temperature=0, extra_body={"reduction": "none"})
    added = len(preparer.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - len(preparer.tokenizer(
        preparer.render_prompt(GenerationRequest(request.parts[:2], system="Be brief.")),
        add_special_tokens=False)["input_ids"])
    assert reply.usage.prompt_tokens - single.usage.prompt_tokens == added > 0


# ---- the budget ---------------------------------------------------------------------------------------------
def test_each_budget_choice(oai):
    def ask(reduction=None, **extra):
        body = {"media_io_kwargs": {"video": {"num_frames": 4}}, **extra}
        if reduction is not None:
            body["reduction"] = reduction
        return oai.chat.completions.create(model="tiny-ov", max_tokens=2, extra_body=body,
                                           messages=user(video_part(), {"type": "text", "text": "Hi"})).usage.aim

    assert ask("none")["plan_source"] == "none"
    assert ask({"none": {}})["plan_source"] == "none"
    plan = {"merge_tokens": 4, "prune_stages": [[2, 0.5]], "importance": "last_token", "positions": "original",
            "proportional_attention": True}
    explicit = ask({"plan": plan})
    assert explicit["plan_source"] == "explicit" and explicit["visual_tokens_merged"] == 4 * 4 + 1
    assert {k: explicit["plan"][k] for k in plan} == plan and explicit["plan_reason"] == "the request gave the plan"
    assert ask()["plan_source"] == "auto"  # nothing said: auto, as on gRPC
    high = ask({"auto": {"slo_ms": 60_000, "priority": "high"}})
    assert high["plan_source"] == "auto" and "(high priority)" in high["plan_reason"]
    floor = ask({"auto": {"slo_ms": 60_000, "min_retention": 0.5}})
    assert floor["plan"]["merge_retention"] in (None, 0.5) and floor["plan_source"] == "auto"
    with pytest.raises(openai.RateLimitError, match="even merge-50 alone .* past the .* it asked for"):
        ask({"auto": {"slo_ms": 1, "min_retention": 0.5}})  # rejected now rather than answered late


# ---- errors, each as the client's own exception type --------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(n=2), "n is not supported"),
    (dict(logprobs=True), "logprobs is not supported"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools is not supported"),
    (dict(response_format={"type": "json_object"}), "response_format is not supported"),
    (dict(max_tokens="5"), "max_tokens must be an integer"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(max_tokens=5000), "exceeds the limit 1024"),
    (dict(extra_body={"reduction": {"plan": {"prune_start": 9, "prune_end": 12}}}), "beyond the model's 6 layers"),
    (dict(extra_body={"reduction": {"plan": {"merge_ratio": 2}}}), "unknown plan field"),
    (dict(extra_body={"reduction": {"plan": {"proportional_attention": "yes"}}}), "must be true or false"),
    (dict(extra_body={"reduction": {"auto": {"priority": "urgent"}}}), "priority must be one of low, normal, high"),
    (dict(extra_body={"reduction": {"auto": {"min_retention": 2}}}), "min_retention must be in [0, 1]"),
    (dict(extra_body={"reductions": "none"}), "unknown field 'reductions'"),
    (dict(messages=user({"type": "input_audio", "input_audio": {}})), "type 'input_audio'"),
    (dict(messages=user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                        {"type": "text", "text": "Hi"})), "invalid base64"),
    (dict(messages=user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {"type": "text", "text": "Hi"})), "remote media URLs are off"),
    (dict(messages=user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
                        {"type": "text", "text": "Hi"})), "outside the allowed media directory"),
    (dict(messages=user({"type": "image_url", "image_url": {"url": data_url(b"not an image", "image/png")}},
                        {"type": "text", "text": "Hi"})), "image"),
    (dict(messages=[{"role": "assistant", "content": "Hi"}]), "last message must be the user's"),
    (dict(messages=[{"role": "tool", "content": "1", "tool_call_id": "x"}]), "tool calls"),
    (dict(messages=user({"type": "text", "text": "   "})), "the prompt has no text"),
])
def test_bad_input_is_a_400_naming_what_was_wrong(oai, kwargs, message):
    body = dict(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}), max_tokens=2)
    body.update(kwargs)
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(**body)
    assert message in err.value.message and err.value.code == "invalid_argument"
    assert err.value.type == "invalid_request_error" and "Traceback" not in err.value.message


def test_bad_input_gets_the_same_message_as_on_grpc(oai, http_server):
    with pytest.raises(openai.BadRequestError) as http_err:
        oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}), max_tokens=2,
                                    extra_body={"reduction": {"plan": {"prune_start": 9, "prune_end": 12}}})
    from aim_engine import ReductionPlan

    with AimClient(http_server.target) as client, pytest.raises(grpc.RpcError) as grpc_err:
        client.generate("Hi", max_new_tokens=2, plan=ReductionPlan(prune_start=9, prune_end=12))
    assert http_err.value.body["message"] == grpc_err.value.details()


def test_a_file_path_escaping_the_allowed_directory_by_dotdot_or_symlink_is_refused(oai, http_server, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(IMAGE)
    link = http_server.media_dir / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    for url in (f"file://{http_server.media_dir}/../{outside.parent.name}/secret.png", f"file://{link}",
                f"file://{http_server.media_dir}/../../../../etc/passwd"):
        with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
            oai.chat.completions.create(model="tiny-ov", max_tokens=2, messages=user(
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}))


def test_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-9", messages=user({"type": "text", "text": "Hi"}))
    assert "unknown model 'gpt-9'" in err.value.message and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")
    assert oai.models.retrieve("tiny-llava").id == "tiny-llava"
    assert [m.id for m in oai.models.list()] == ["tiny-ov", "tiny-llava"]


def test_malformed_json_and_huge_bodies(http_server):
    url = f"{http_server.base_url}/chat/completions"
    bad = httpx.post(url, content=b'{"model": "tiny-ov", "messages": [', timeout=60)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.post(url, content=b"[1, 2]", timeout=60).status_code == 400
    assert httpx.post(url, content=b'{"messages": NaN}', timeout=60).status_code == 400
    status, message = post_json(http_server.base_url, b" " * (BASE.max_message_bytes + 1), declared_only=True)
    assert status == 413 and "the limit is" in message  # from Content-Length, before any of the body is read
    assert httpx.get(f"{http_server.base_url}/nothing-here", timeout=60).json()["error"]["type"]


def test_media_over_the_limit_is_a_413(make_server, tiny_engines):
    srv = make_server(http_port=0, max_media_bytes=len(IMAGE) - 1)
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="tiny-ov", messages=user(image_part(), {"type": "text", "text": "Hi"}))
    assert err.value.status_code == 413 and "the limit is" in err.value.message


def test_the_bearer_token_is_the_same_as_on_grpc(make_server):
    srv = make_server(http_port=0, auth_token="s3cret")
    base = f"http://127.0.0.1:{srv.running.http_port}/v1"
    for key, message in (("wrong", "invalid bearer token"),):
        with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as c, \
                pytest.raises(openai.AuthenticationError, match=message):
            c.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}))
    assert httpx.get(f"{base}/models").status_code == 401
    with openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0) as c:
        assert c.chat.completions.create(model="tiny-ov", max_tokens=2,
                                         messages=user({"type": "text", "text": "Hi"})).usage.completion_tokens
    assert httpx.get(f"http://127.0.0.1:{srv.running.http_port}/ready").status_code == 200  # probes need none


def test_load_shedding_is_a_429_with_retry_after_and_shared_with_grpc(make_server):
    srv = make_server(http_port=0, max_batch=1, max_queue=0, max_new_tokens=HOLD_TOKENS)
    with AimClient(srv.target) as client:
        held = hold(client)  # the only place, taken over gRPC
        try:
            response = httpx.post(f"http://127.0.0.1:{srv.running.http_port}/v1/chat/completions", timeout=60,
                                  json={"model": "tiny-ov", "messages": user({"type": "text", "text": "Hi"})})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x",
                               max_retries=0) as c, pytest.raises(openai.RateLimitError, match="retry with backoff"):
                c.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}))
        finally:
            held.cancel()


def test_a_deadline_in_the_body_is_a_504(make_server):
    srv = make_server(http_port=0, max_batch=1, max_queue=1, max_new_tokens=HOLD_TOKENS)
    with AimClient(srv.target) as client:
        held = hold(client)  # runs until cancelled: the request behind it cannot start before its deadline
        try:
            with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x",
                               max_retries=0) as c, pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}),
                                          extra_body={"deadline_ms": 300})
            assert err.value.status_code == 504 and err.value.code == "deadline_exceeded"
        finally:
            held.cancel()


def test_not_ready_until_the_models_are_loaded():
    """Listening, models not loaded (start_listening alone): alive, not ready, and requests get a 503."""
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = replace(BASE, http_port=0)
    running = asyncio.run_coroutine_threadsafe(start_listening(settings), loop).result(60)
    try:
        base = f"http://127.0.0.1:{running.http_port}"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        not_ready = httpx.get(f"{base}/ready", timeout=30)
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "unavailable"
        with openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c, \
                pytest.raises(openai.InternalServerError) as err:
            c.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}))
        assert err.value.status_code == 503 and "not serving" in err.value.message
    finally:
        asyncio.run_coroutine_threadsafe(running.drain_and_stop(0.1), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# ---- clients that leave, and many at once ----------------------------------------------------------------------
def test_a_client_that_leaves_mid_stream_frees_its_sequence(oai, http_server):
    wait_until(lambda: in_system(http_server) == 0, "an idle server")
    stream = oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Go on."}),
                                         max_tokens=HOLD_TOKENS // 4, extra_body={"ignore_eos": True}, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    wait_until(lambda: running(http_server) == 1, "the stream's sequence in the batch")
    stream.close()
    wait_until(lambda: in_system(http_server) == 0, "the sequence freed after its client left")


def test_a_client_that_leaves_before_a_unary_answer_frees_its_sequence(http_server):
    wait_until(lambda: in_system(http_server) == 0, "an idle server")
    body = {"model": "tiny-ov", "messages": user({"type": "text", "text": "Go on."}), "max_tokens": HOLD_TOKENS // 4,
            "ignore_eos": True}
    client = httpx.Client(timeout=120)
    errors = []

    def call():
        try:
            client.post(f"{http_server.base_url}/chat/completions", json=body)
        except httpx.HTTPError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: running(http_server) == 1, "the request's sequence in the batch")
    client.close()  # closes its connection under the waiting call
    wait_until(lambda: in_system(http_server) == 0, "the sequence freed after its client left")
    caller.join(60)


def test_sixteen_concurrent_streams_lose_and_reorder_nothing_and_free_every_sequence(oai, http_server):
    prompts = [f"Question {i}: tell me about number {i * 7}." for i in range(16)]

    def unary(prompt):
        return oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": prompt}),
                                           max_tokens=8 + len(prompt) % 9, temperature=0,
                                           extra_body={"reduction": "none"}).choices[0].message.content

    def streamed(prompt):
        chunks = oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": prompt}),
                                             max_tokens=8 + len(prompt) % 9, temperature=0, stream=True,
                                             extra_body={"reduction": "none"})
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    expected = [unary(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(streamed, prompts))
    assert got == expected
    wait_until(lambda: in_system(http_server) == 0, "every sequence freed")
    engine = http_server.running.state.runtimes["tiny-ov"].engine
    held = engine.prefix_cache.bytes if engine.prefix_cache is not None else 0
    assert engine.pool.used_blocks * engine.pool.block_bytes == held  # KV in use: only what the cache holds


# ---- every wire moves the same series ------------------------------------------------------------------------
SERIES = [("aim_requests_total", {"model": "tiny-ov", "outcome": "ok"}),
          ("aim_request_duration_seconds_count", {"model": "tiny-ov", "slo_class": "default"}),
          ("aim_llm_prefill_flops_total", {"model": "tiny-ov"}),
          ("aim_plans_total", {"model": "tiny-ov", "source": "none"}),
          ("aim_time_to_first_token_seconds_count", {"model": "tiny-ov"})]


def test_a_request_on_each_wire_moves_the_same_series(oai, http_server):
    def send_grpc():
        with AimClient(http_server.target) as client:
            client.generate("Hi", max_new_tokens=2, no_reduction=True)

    def send_oip():
        request = kserve_pb.ModelInferRequest(model_name="tiny-ov")
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
        request.parameters["aim_reduction"].string_param = "none"
        request.parameters["aim_max_new_tokens"].int64_param = 2
        with grpc.insecure_channel(http_server.target) as channel:
            kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)

    def send_http():
        oai.chat.completions.create(model="tiny-ov", messages=user({"type": "text", "text": "Hi"}), max_tokens=2,
                                    extra_body={"reduction": "none"})

    for wire in (send_grpc, send_oip, send_http):
        before = [metric_value(http_server, m, **labels) for m, labels in SERIES]
        wire()
        after = [metric_value(http_server, m, **labels) for m, labels in SERIES]
        moved = [b < a for b, a in zip(before, after)]
        assert all(moved), (wire.__name__, [s for s, m in zip(SERIES, moved) if not m])
        counts = [a - b for (m, _), b, a in zip(SERIES, before, after) if not m.endswith("flops_total")]
        assert counts == [1.0] * len(counts), (wire.__name__, counts)


def test_a_remote_url_on_an_allowed_host_is_fetched_and_a_redirect_is_refused(make_server):
    """A real HTTP server on loopback holds the image; the operator allows its host. A redirect could leave the
    allowed hosts, so it is refused, not followed."""
    import http.server

    class Media(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(IMAGE)))
                self.end_headers()
                self.wfile.write(IMAGE)
            else:
                self.send_response(302)
                self.send_header("Location", "http://example.com/a.png")
                self.end_headers()

        def log_message(self, *args):
            pass

    media = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Media)
    threading.Thread(target=media.serve_forever, daemon=True).start()
    try:
        srv = make_server(http_port=0, allowed_media_domains="127.0.0.1")
        base = f"http://127.0.0.1:{media.server_port}"
        with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x", max_retries=0) as c:
            reply = c.chat.completions.create(model="tiny-ov", max_tokens=2, extra_body={"reduction": "none"},
                                              messages=user({"type": "image_url", "image_url": {"url": f"{base}/a.png"}},
                                                            {"type": "text", "text": "Hi"}))
            assert reply.usage.aim["visual_tokens_in"] > 0
            with pytest.raises(openai.BadRequestError, match="fetching it failed"):
                c.chat.completions.create(model="tiny-ov", max_tokens=2, messages=user(
                    {"type": "image_url", "image_url": {"url": f"{base}/moved.png"}}, {"type": "text", "text": "Hi"}))
    finally:
        media.shutdown()
