"""OpenAI chat-completions JSON <-> the service's own types. JSON stops here; media URLs are read here.

A request body is checked field by field, and every refusal names the field (`messages[1].content[0].image_url`)
and says what to send instead, with the same engine messages as gRPC for what the engine checks. Extensions of
aim-serve's own, sent by the `openai` client through `extra_body`:
  reduction        "auto" (default) | "none" | {"auto": {"slo_ms", "min_retention", "priority"}}
                   | {"plan": {ReductionPlan fields, aim_engine.plan.PLAN_FIELDS}} | {"none": {}}
  media_io_kwargs  {"video": {"num_frames": N}}: frames sampled from each video (vLLM's name for it)
  deadline_ms      the server gives up after this many milliseconds from arrival (504)
  ignore_eos       generate exactly max_tokens (benchmarks; vLLM's name)
"""

from __future__ import annotations

import base64
import binascii
import os
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from aim_engine import GenerationRequest, SamplingParams
from aim_engine.errors import GenerationError, PlanError
from aim_engine.mime import sniff_mime_type
from aim_engine.plan import plan_from_values, plan_to_dict
from aim_engine.request import ImagePart, TextPart, VideoPart
from .types import Finished, Reduction, ServiceError, auto_reduction

# Fields of the OpenAI request this server reads; anything else is refused by name, so a typo is not ignored.
_READ = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "seed", "stop", "reduction", "media_io_kwargs", "deadline_ms", "ignore_eos"}
# Accepted and without effect here (bookkeeping fields of the OpenAI API).
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted only at the value that means "off": the feature is not supported.
_OFF = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
        "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]),
        "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}
_FINISH = {"stop": "stop", "length": "length"}


@dataclass(frozen=True)
class MediaAccess:
    """Where media URLs may point (the operator's settings): `local_root` is the directory `file://` URLs must
    resolve inside (symlinks followed; "" = none allowed); `remote_hosts` the hosts http(s) URLs may name
    (empty = none). `max_bytes` bounds what one URL may bring."""

    local_root: str = ""
    remote_hosts: frozenset[str] = frozenset()
    max_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    model: str
    request: GenerationRequest
    reduction: Reduction
    stream: bool
    include_usage: bool
    deadline_s: float | None  # seconds from arrival


def _bad(message: str, param: str | None = None) -> ServiceError:
    """Bad input, naming the request field at fault (OpenAI's error `param`)."""
    return ServiceError("invalid_argument", message, param=param)


def _typed(body: dict, name: str, kinds, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(f"{name} must be {what}, got {value!r}", name)
    return value


def chat_request_from_json(body: object, settings, access: MediaAccess) -> ChatRequest:
    """A parsed JSON body -> what the runtime serves. Raises ServiceError naming the bad field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for name in body:
        if name in _OFF:
            if body[name] not in _OFF[name]:
                raise _bad(f"{name} is not supported by this server; leave it out", name)
        elif name not in _READ and name not in _IGNORED:
            raise _bad(f"unknown field {name!r}; this server reads {', '.join(sorted(_READ))}", name)
    model = _typed(body, "model", (str,), "a string (a served model's id, GET /v1/models)", "")
    stream = _typed(body, "stream", (bool,), "true or false", False)
    options = _typed(body, "stream_options", (dict,), "an object", {})
    if options and not stream:
        raise _bad("stream_options is only for stream: true", "stream_options")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise _bad(f"unknown stream_options {sorted(unknown)}; use include_usage", "stream_options")
    include_usage = _typed(options, "include_usage", (bool,), "true or false", False)
    frames = _num_frames(body.get("media_io_kwargs"))
    system, parts, turns = _messages(body.get("messages"), frames, access)
    deadline_ms = _typed(body, "deadline_ms", (int, float), "a number of milliseconds > 0")
    if deadline_ms is not None and deadline_ms <= 0:
        raise _bad(f"deadline_ms must be > 0, got {deadline_ms}", "deadline_ms")
    try:
        request = GenerationRequest(parts, _sampling(body, settings), system, tuple(turns))
        reduction = _reduction(body.get("reduction"))
    except (PlanError, GenerationError) as exc:
        raise _bad(str(exc)) from None
    return ChatRequest(model, request, reduction, stream, include_usage,
                       None if deadline_ms is None else deadline_ms / 1000)


def _num_frames(kwargs) -> int:
    if kwargs is None:
        return 0
    if not isinstance(kwargs, dict) or set(kwargs) - {"video", "image"}:
        raise _bad('media_io_kwargs must be {"video": {"num_frames": N}}', "media_io_kwargs")
    video = kwargs.get("video") or {}
    if not isinstance(video, dict) or set(video) - {"num_frames"}:
        raise _bad('media_io_kwargs.video takes only num_frames, e.g. {"video": {"num_frames": 16}}',
                   "media_io_kwargs")
    frames = _typed(video, "num_frames", (int,), "an integer >= 1", 0)
    if video.get("num_frames") is not None and frames < 1:
        raise _bad(f"media_io_kwargs.video.num_frames must be >= 1, got {frames}", "media_io_kwargs")
    return frames


def _messages(messages, frames: int, access: MediaAccess):
    """-> (system text or None, parts, turns). Leading system / developer messages become the system prompt."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    system, parts, turns = [], [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with role and content", "messages")
        role = message.get("role")
        if set(message) - {"role", "content", "name"}:
            extra = sorted(set(message) - {"role", "content", "name"})
            raise _bad(f"{where} has {extra}: tool calls and audio are not supported; send role and content",
                       "messages")
        if role in ("system", "developer"):
            if turns:
                raise _bad(f"{where} is a {role} message after the conversation started; put system messages "
                           "first", "messages")
            system.append(_text_only(message.get("content"), where))
        elif role in ("user", "assistant"):
            content = _content(message.get("content"), where, role, frames, access)
            parts += content
            turns.append((role, len(content)))
        else:
            raise _bad(f"{where}.role must be system, developer, user or assistant, got {role!r}", "messages")
    if not turns or turns[-1][0] != "user":
        raise _bad("the last message must be the user's: it is the one answered", "messages")
    return ("\n\n".join(system) or None), parts, turns


def _text_only(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_text(p, f"{where}.content[{j}]") for j, p in enumerate(content))
    raise _bad(f"{where}.content must be a string or a list of text parts", "messages")


def _text(part: dict, where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}.text must be a string", "messages")
    return text


def _content(content, where: str, role: str, frames: int, access: MediaAccess) -> list:
    if isinstance(content, str):
        return [TextPart(content)]
    if role == "assistant":
        return [TextPart(_text_only(content, where))]
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content must be a string or a non-empty list of parts", "messages")
    out = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(TextPart(_text(part, at)))
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref if isinstance(ref, str) else None
            if not isinstance(url, str):
                raise _bad(f'{at}.{kind} must be {{"url": "..."}}', "messages")
            data, mime = read_media_url(url, f"{at}.{kind}.url", access)
            out.append(ImagePart(data=data, mime_type=mime) if kind == "image_url" else
                       VideoPart(data=data, mime_type=mime, num_frames=frames))
        else:
            raise _bad(f"{at} has type {kind!r}; this server takes text, image_url and video_url parts",
                       "messages")
    return out


def read_media_url(url: str, where: str, access: MediaAccess) -> tuple[bytes, str]:
    """The bytes and MIME type behind a media URL: `data:` (base64), `file://` under the allowed directory, or
    http(s) on an allowed host. Raises ServiceError (too_large past `access.max_bytes`)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise _bad(f"{where} is not a base64 data URL: write data:<mime>;base64,<bytes>", "messages")
        if len(payload) * 3 // 4 > access.max_bytes:
            raise _too_large(where, len(payload) * 3 // 4, access)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"{where} has invalid base64 ({exc})", "messages") from None
        declared = header[:-len(";base64")].split(";", 1)[0].strip().lower()
    elif scheme == "file":
        data, declared = _read_local(url, where, access), ""
    elif scheme in ("http", "https"):
        data, declared = _fetch(url, where, access), ""
    else:
        raise _bad(f"{where} must be a data:, file:// or http(s):// URL", "messages")
    if not data:
        raise _bad(f"{where} holds no bytes", "messages")
    # the bytes say what they are; a declared type the bytes contradict is left for the engine to refuse
    return data, sniff_mime_type(data) or declared


def _too_large(where: str, size: int, access: MediaAccess) -> ServiceError:
    return ServiceError("invalid_argument", f"{where} is {size} bytes; the limit is {access.max_bytes} bytes "
                                            "(--max-media-bytes)", too_large=True)


def _read_local(url: str, where: str, access: MediaAccess) -> bytes:
    if not access.local_root:
        raise _bad(f"{where}: file:// URLs are off on this server (the operator allows a directory with "
                   "--allowed-local-media-path); send the media as a data: URL", "messages")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise _bad(f"{where}: a file:// URL names no host (file:///path)", "messages")
    root = Path(os.path.realpath(access.local_root))
    path = Path(os.path.realpath(urllib.parse.unquote(parsed.path)))  # symlinks and .. resolved first
    if not path.is_relative_to(root):
        raise _bad(f"{where}: the file is outside the allowed media directory", "messages")
    try:
        with open(path, "rb") as f:
            data = f.read(access.max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise _bad(f"{where}: no readable file at that path under the allowed media directory", "messages") from None
    if len(data) > access.max_bytes:
        raise _too_large(where, path.stat().st_size, access)
    return data


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could leave the allowed hosts
        return None


def _fetch(url: str, where: str, access: MediaAccess) -> bytes:
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    if host not in access.remote_hosts:
        raise _bad(f"{where}: remote media URLs are off for host {host!r} on this server (the operator allows "
                   "hosts with --allowed-media-domains); send the media as a data: URL", "messages")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=access.fetch_timeout_s) as response:
            data = response.read(access.max_bytes + 1)
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise _bad(f"{where}: fetching it failed ({exc})", "messages") from None
    if len(data) > access.max_bytes:
        raise _too_large(where, len(data), access)
    return data


def _sampling(body: dict, settings) -> SamplingParams:
    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer >= 1") or \
        _typed(body, "max_tokens", (int,), "an integer >= 1")
    if max_tokens is None:
        max_tokens = settings.default_max_new_tokens
    if max_tokens > settings.max_new_tokens:
        raise _bad(f"max_tokens {max_tokens} exceeds the limit {settings.max_new_tokens}", "max_tokens")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop or ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings", "stop")
    return SamplingParams(max_new_tokens=max_tokens,
                          temperature=float(_typed(body, "temperature", (int, float), "a number >= 0", 1.0)),
                          top_p=float(_typed(body, "top_p", (int, float), "a number in (0, 1]", 1.0)),
                          seed=_typed(body, "seed", (int,), "an integer"), stop=tuple(stops),
                          ignore_eos=_typed(body, "ignore_eos", (bool,), "true or false", False))


def _reduction(value) -> Reduction:
    if value is None or value == "auto":
        return Reduction("auto")
    if value == "none":
        return Reduction("none")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("auto", "plan", "none"):
        raise _bad('reduction must be "auto", "none", {"auto": {...}}, {"plan": {...}} or {"none": {}}',
                   "reduction")
    kind, fields = next(iter(value.items()))
    if not isinstance(fields, dict):
        raise _bad(f"reduction.{kind} must be an object", "reduction")
    if kind == "none":
        return Reduction("none")
    if kind == "plan":
        return Reduction("plan", plan=plan_from_values(fields, label="reduction.plan."))
    unknown = set(fields) - {"slo_ms", "min_retention", "priority"}
    if unknown:
        raise _bad(f"unknown reduction.auto fields {sorted(unknown)}; use slo_ms, min_retention, priority",
                   "reduction")
    return auto_reduction(_typed(fields, "slo_ms", (int, float), "a number of milliseconds >= 0"),
                          float(_typed(fields, "min_retention", (int, float), "a number in [0, 1]", 0.0)),
                          _typed(fields, "priority", (str,), "a string", "normal"), "reduction.auto.", "reduction")


# ---- results ------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_json(done: Finished) -> dict:
    """OpenAI's usage (prompt_tokens after reduction) plus aim-serve's extension under "aim"."""
    s, applied = done.result.stats, done.applied
    return {
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "aim": {
            "visual_tokens_in": s.visual_tokens_in, "visual_tokens_merged": s.visual_tokens_merged,
            "visual_tokens_last_layer": s.visual_tokens_per_layer[-1] if s.visual_tokens_per_layer else 0,
            "visual_tokens_per_layer": list(s.visual_tokens_per_layer),
            "prefill_flops": s.prefill_flops, "prefill_flops_baseline": s.prefill_flops_baseline,
            "prefill_flops_reused": s.prefill_flops_reused,
            "saved_fraction": s.saved_fraction,
            "plan": plan_to_dict(applied.plan), "plan_description": applied.plan.describe(),
            "plan_source": applied.source, "plan_reason": applied.reason,
            "feature_cache_hits": s.feature_cache_hits, "feature_cache_misses": s.feature_cache_misses,
            "prefix_tokens_reused": s.prefix_tokens_reused,
            "queue_seconds": done.queue_s, "total_seconds": done.total_s,
        },
    }


def completion_json(cid: str, model: str, created: int, done: Finished) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.result.text},
                         "logprobs": None, "finish_reason": _FINISH[done.result.finish_reason]}],
            "usage": usage_json(done)}


def chunk_json(cid: str, model: str, created: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk_json(cid: str, model: str, created: int, done: Finished) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage_json(done)}


def now() -> int:
    return int(time.time())
