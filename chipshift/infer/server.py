"""An OpenAI-compatible HTTP server over the engine (FastAPI).

Routes: /v1/models, /v1/completions, /v1/chat/completions (with `stream: true` as
server-sent events, exactly as OpenAI sends them: `data: {json}` blocks, then
`data: [DONE]`), /health, /metrics (Prometheus text) and / (a small chat page).

Requests are validated by hand so that every mistake gets an OpenAI-style error
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status naming the field;
parameters chipshift does not implement are refused by name rather than ignored.

Log-probabilities: /v1/completions takes `logprobs` (0..5 alternatives, OpenAI's limit) and
`echo` (the prompt comes back before the completion, with its tokens' log-probabilities when
`logprobs` is set; the first token has none); /v1/chat/completions takes `logprobs` (a
boolean) and `top_logprobs` (0..20). They are the model's own log-softmax, before repetition
penalty, temperature and top-k/top-p (see chipshift.infer.sampling). There is one entry per
generated token but for a final stop token (whose text is not shown either); when a stop
string ends the output, the tokens that spelled it keep their entries. Streamed, a chunk
carries the entries of the tokens generated since the previous chunk, so that the chunks'
entries joined are the non-streamed response's. A log-probability below -9999 is reported
as -9999 (as OpenAI does; JSON has no infinity). With an
API key, every route but /health and the static page needs `Authorization: Bearer KEY`
(the page itself asks for the key and sends it with its API calls).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import secrets
import threading
import time
from importlib import resources

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from chipshift.errors import ChipshiftError
from chipshift.infer.engine import TTFT_BUCKETS, Engine, Request
from chipshift.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob

# Parameters of the OpenAI API that chipshift does not implement: refused, not ignored.
UNSUPPORTED = {"best_of", "suffix", "logit_bias", "tools",
               "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls",
               "audio", "modalities", "prediction", "reasoning_effort", "web_search_options"}
# Accepted and without effect on a single local model.
IGNORED = {"user", "metadata", "store", "service_tier"}
# top_k, repetition_penalty and ignore_eos are extensions (named as vLLM names them).
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
          "stream", "stream_options", "n", "presence_penalty", "frequency_penalty", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# The most alternatives per token /v1/completions returns (OpenAI's limit; chat allows 20).
MAX_COMPLETION_LOGPROBS = 5
# The lowest log-probability reported (OpenAI's floor; JSON has no -Infinity).
LOGPROB_FLOOR = -9999.0
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def error_response(status: int, message: str, param: str | None = None,
                   type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# -- validation ----------------------------------------------------------------------------
def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a number, got {json.dumps(value)[:40]}", key)
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' = {value} is out of range [{lo}, {hi}]", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer, got {json.dumps(value)[:40]}", key)
    return value


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be a boolean, got {json.dumps(value)[:40]}", key)
    return value


def _count(body: dict, key: str, hi: int) -> int | None:
    value = _integer(body, key, None)
    if value is not None and not 0 <= value <= hi:
        raise APIError(400, f"'{key}' = {value} is out of range [0, {hi}]", key)
    return value


def logprob_settings(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(alternatives per token, or None for no log-probabilities; echo the prompt)."""
    if not chat:
        return _count(body, "logprobs", MAX_COMPLETION_LOGPROBS), _boolean(body, "echo")
    top = _count(body, "top_logprobs", MAX_TOP_LOGPROBS)
    if not _boolean(body, "logprobs"):
        if top is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None, False
    return top or 0, False


def parse_body(raw: bytes, allowed: set[str]) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key in body:
        if key in UNSUPPORTED and body[key] not in (None, False):
            raise APIError(400, f"'{key}' is not supported by this server", key, code="unsupported_parameter")
        if key not in allowed | UNSUPPORTED | IGNORED:
            raise APIError(400, f"unrecognized request argument supplied: {key}", key)
    return body


def sampling_from(body: dict, engine: Engine, default_max_tokens: int | None, prompt_len: int,
                  max_key: str = "max_tokens") -> tuple[SamplingParams, bool, bool]:
    """Validate the shared fields; return (settings, stream, include_usage)."""
    n = _integer(body, "n", 1)
    if n != 1:
        raise APIError(400, f"'n' = {n} is not supported: this server returns one choice per request", "n",
                       code="unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0:
            raise APIError(400, f"'{key}' is not supported (use 'repetition_penalty')", key,
                           code="unsupported_parameter")
    room = engine.max_len - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {engine.max_len} "
                            f"tokens", "messages" if max_key == "max_completion_tokens" else "prompt",
                       code="context_length_exceeded")
    max_tokens = _integer(body, max_key, None)
    if max_tokens is None and max_key == "max_completion_tokens":
        max_tokens = _integer(body, "max_tokens", None)
    if max_tokens is None:
        max_tokens = min(default_max_tokens or room, room)
    if max_tokens <= 0:
        raise APIError(400, f"'max_tokens' = {max_tokens}: must be at least 1", "max_tokens")
    if max_tokens > room:
        raise APIError(400, f"'max_tokens' = {max_tokens} with a {prompt_len}-token prompt exceeds the context "
                            f"of {engine.max_len} tokens (at most {room})", "max_tokens",
                       code="context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    seed = _integer(body, "seed", None)
    top_k = _integer(body, "top_k", 0)
    if top_k < 0:
        raise APIError(400, f"'top_k' = {top_k}: must be >= 0 (0 turns it off)", "top_k")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise APIError(400, "'top_p' must be greater than 0", "top_p")
    stream = _boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' must be an object with an optional boolean 'include_usage'",
                       "stream_options")
    if body.get("stream_options") and not stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    params = SamplingParams(
        max_tokens=max_tokens, ignore_eos=_boolean(body, "ignore_eos"),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=top_k, top_p=top_p,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        seed=None if seed is None else seed & 0x7FFFFFFF,
        stop=tuple(stop),
    )
    return params, stream, bool(options.get("include_usage", False))


def check_model(body: dict, name: str) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a 'model' parameter", "model")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    if model != name:
        raise APIError(404, f"the model '{model[:100]}' does not exist; this server serves '{name}'", "model",
                       code="model_not_found")


def completion_prompt(body: dict, engine: Engine) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer: send 'prompt' as a list of token ids", "prompt")
        ids = engine.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        if not all(0 <= t < engine.cfg.vocab_size for t in prompt):
            raise APIError(400, f"token ids in 'prompt' must be in [0, {engine.cfg.vocab_size})", "prompt")
        ids = list(prompt)
    elif prompt is None:
        raise APIError(400, "you must provide a 'prompt' parameter", "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "batched prompts are not supported: send one prompt per request", "prompt",
                       code="unsupported_parameter")
    else:
        raise APIError(400, "'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise APIError(400, "'prompt' is empty", "prompt")
    return ids


def chat_prompt(body: dict, engine: Engine) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "you must provide a 'messages' parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"'{where}.content': only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string", f"{where}.content")
        clean.append({"role": role, "content": content})
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise APIError(400, "this checkpoint has no chat template: use /v1/completions", "messages")
    try:
        text = engine.tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except ChipshiftError as exc:
        raise APIError(400, str(exc), "messages") from None
    return engine.tokenizer.encode(text)


# -- the app -------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.http = {}  # (route, status) -> count

    def count(self, route: str, status: int) -> None:
        key = (route, status)
        self.http[key] = self.http.get(key, 0) + 1

    def render(self, engine: Engine) -> str:
        s = engine.stats
        lines = ["# HELP chipshift_http_requests_total HTTP requests by route and status.",
                 "# TYPE chipshift_http_requests_total counter"]
        lines += [f'chipshift_http_requests_total{{route="{r}",status="{c}"}} {n}'
                  for (r, c), n in sorted(self.http.items())]
        lines += ["# HELP chipshift_requests_total Generations finished, by finish reason.",
                  "# TYPE chipshift_requests_total counter"]
        lines += [f'chipshift_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(s.requests.items())]
        lines += ["# HELP chipshift_prompt_tokens_total Prompt tokens prefilled.",
                  "# TYPE chipshift_prompt_tokens_total counter", f"chipshift_prompt_tokens_total {s.prompt_tokens}",
                  "# HELP chipshift_generation_tokens_total Tokens generated.",
                  "# TYPE chipshift_generation_tokens_total counter",
                  f"chipshift_generation_tokens_total {s.generated_tokens}",
                  "# HELP chipshift_decode_steps_total Batched decode steps run.",
                  "# TYPE chipshift_decode_steps_total counter", f"chipshift_decode_steps_total {s.decode_steps}",
                  "# HELP chipshift_queue_length Requests waiting for a batch slot.",
                  "# TYPE chipshift_queue_length gauge", f"chipshift_queue_length {len(engine.waiting)}",
                  "# HELP chipshift_active_slots Batch slots generating now.",
                  "# TYPE chipshift_active_slots gauge", f"chipshift_active_slots {engine.num_active}",
                  "# HELP chipshift_max_slots Batch slots available.",
                  "# TYPE chipshift_max_slots gauge", f"chipshift_max_slots {engine.max_batch}",
                  "# HELP chipshift_time_to_first_token_seconds From submission to the first token.",
                  "# TYPE chipshift_time_to_first_token_seconds histogram"]
        lines += [f'chipshift_time_to_first_token_seconds_bucket{{le="{b}"}} {n}'
                  for b, n in zip(TTFT_BUCKETS, s.ttft_buckets)]
        lines += [f'chipshift_time_to_first_token_seconds_bucket{{le="+Inf"}} {s.ttft_count}',
                  f"chipshift_time_to_first_token_seconds_sum {s.ttft_sum:.6f}",
                  f"chipshift_time_to_first_token_seconds_count {s.ttft_count}"]
        return "\n".join(lines) + "\n"


class Relay:
    """Carries the engine's token updates to the event loop: one wakeup per prefill or
    decode step instead of one per token per stream.

    The scheduler then waits (at most `wait` seconds) until the loop has pushed that
    step's chunks to the sockets, so that the HTTP work runs between two steps rather than
    during one: on a CPU, an HTTP thread woken in the middle of a step takes a core from the
    compute threads, and the step waits for it. SmolLM2, 8 streaming clients on this
    project's 2-core CPU: 116-126 tok/s aggregate with a wakeup per token, 124-157 with
    one per step."""

    def __init__(self, wait: float = 0.05) -> None:
        self.wait = wait
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[tuple[asyncio.Queue, tuple[str, bool]]] = []
        self.lock = threading.Lock()
        self.sent = threading.Event()

    def put(self, queue: asyncio.Queue, item: tuple[str, bool]) -> None:
        """Called by `on_update`, on the scheduler's thread."""
        with self.lock:
            self.pending.append((queue, item))

    def deliver(self) -> None:
        """`Engine.deliver`: hand the step's updates over, then wait for them to go out."""
        with self.lock:
            items, self.pending = self.pending, []
        if not items or self.loop is None:
            return
        self.sent.clear()
        try:
            self.loop.call_soon_threadsafe(self._push, items)
        except RuntimeError:  # the event loop is gone: the server has stopped
            return
        self.sent.wait(self.wait)

    def _push(self, items) -> None:
        for queue, item in items:
            queue.put_nowait(item)
        # the streams woken above run before this: by then their chunks are written
        self.loop.call_soon(self.sent.set)


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class LogprobWriter:
    """Log-probability entries as the OpenAI API spells them: a completion's `tokens`,
    `token_logprobs`, `top_logprobs` (the alternatives and the chosen token) and
    `text_offset`, or chat's `content` list. Keeps the running character offset across a
    stream's chunks. A token's string is its text; a token that holds a piece of a UTF-8
    character is spelled `bytes:\\xe4\\xb8` as OpenAI spells it (chat's `bytes` holds the
    piece too)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.offset = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _token(self, token_id: int) -> tuple[str, bytes]:
        if self.tokenizer is None:  # then the server returns no text either: offsets stay 0
            return f"token_id:{token_id}", b""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def completion(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(ids, entries):
            text, raw = self._token(token_id)
            shown = self._utf8.decode(raw)  # a whole token's text comes after any replaced pieces
            out["tokens"].append(text)
            out["text_offset"].append(self.offset + len(shown) - len(text) if shown.endswith(text) else self.offset)
            self.offset += len(shown)
            if entry is None:  # a prompt's first token: nothing came before it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_floor(entry.logprob))
            top = {self._token(t)[0]: _floor(lp) for t, lp in entry.top}
            top.setdefault(text, _floor(entry.logprob))
            out["top_logprobs"].append(top)
        return out

    def chat(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text, raw = self._token(token_id)
            return {"token": text, "logprob": _floor(logprob), "bytes": list(raw)}

        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}


class _AuthAndCount:
    """API-key check and request counting as plain ASGI middleware. (Starlette's
    `@app.middleware("http")` passes every streamed chunk through an extra task and memory
    stream: a cost per token per stream.)"""

    COUNTED = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self, app, api_key: str | None, public: set[str], metrics: "Metrics") -> None:
        self.app, self.api_key, self.public, self.metrics = app, api_key, public, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and path not in self.public:
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                        self.api_key.encode()):
                self.metrics.count(path if path.startswith("/v1/") else "other", 401)
                response = error_response(401, "Incorrect API key provided. Send 'Authorization: Bearer <key>'.",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        if path not in self.COUNTED:
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app; the caller runs the engine's scheduler (`Engine.run` or `start`)."""
    app = FastAPI(title="chipshift", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    relay = Relay()
    engine.deliver = relay.deliver
    created = int(time.time())
    public = {"/health", "/"}

    app.add_middleware(_AuthAndCount, api_key=api_key, public=public, metrics=metrics)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return error_response(400, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("chipshift.infer").joinpath("static/index.html").read_text())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "chipshift"}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = parse_body(await request.body(), COMPLETION_FIELDS)
        check_model(body, model_name)
        ids = completion_prompt(body, engine)
        params, stream, usage = sampling_from(body, engine, 16, len(ids))
        params.logprobs, echo = logprob_settings(body, chat=False)
        params.prompt_logprobs = params.logprobs if echo else None
        return await run(ids, params, stream, usage, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = parse_body(await request.body(), CHAT_FIELDS)
        check_model(body, model_name)
        ids = chat_prompt(body, engine)
        params, stream, usage = sampling_from(body, engine, default_max_tokens, len(ids),
                                              max_key="max_completion_tokens")
        params.logprobs, _ = logprob_settings(body, chat=True)
        return await run(ids, params, stream, usage, chat=True)

    async def run(ids: list[int], params: SamplingParams, stream: bool, include_usage: bool, chat: bool,
                  echo: bool = False):
        relay.loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_update(req: Request, delta: str, finished: bool) -> None:
            # with the count of tokens whose log-probabilities this update may release
            relay.put(queue, (delta, finished, len(req.output_ids) - req.stop_token))

        req = Request(ids, params, on_update=on_update)
        try:
            engine.submit(req)
        except ChipshiftError as exc:
            raise APIError(400, str(exc)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + req.id
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}

        def usage() -> dict:
            n = len(req.output_ids)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def finish_reason() -> str:
            return "length" if req.finish_reason == "length" else "stop"

        writer = None if params.logprobs is None else LogprobWriter(engine.tokenizer)
        prompt_text = engine.tokenizer.decode(ids) if echo and engine.tokenizer is not None else ""
        sent = 0  # output tokens whose log-probabilities have gone out

        def logprobs(upto: int, prompt: bool = False) -> dict | None:
            """The entries of the output tokens sent..upto (or of the prompt), as rendered."""
            nonlocal sent
            if writer is None:
                return None
            if prompt:
                return writer.completion(ids, req.prompt_logprobs)
            start, sent = sent, max(sent, upto)
            entries = req.logprobs[start:upto]
            return writer.chat(entries) if chat else writer.completion(req.output_ids[start:upto], entries)

        if not stream:
            try:
                while not (await queue.get())[1]:
                    pass
            finally:
                req.cancel()  # no effect once finished; frees the slot if the client went away
            if req.finish_reason == "error":
                return error_response(500, f"generation failed: {req.error}", type_="server_error")
            shown = len(req.output_ids) - req.stop_token
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": req.text},
                          "logprobs": logprobs(shown), "finish_reason": finish_reason()}
                return {**base, "object": "chat.completion", "choices": [choice], "usage": usage()}
            rendered = logprobs(0, prompt=True) if echo else None
            if rendered is not None:  # the prompt's entries, then the completion's
                generated = logprobs(shown)
                rendered = {key: value + generated[key] for key, value in rendered.items()}
            else:
                rendered = logprobs(shown)
            choice = {"index": 0, "text": prompt_text + req.text, "logprobs": rendered,
                      "finish_reason": finish_reason()}
            return {**base, "choices": [choice], "usage": usage()}

        def chunk(delta: str | None, reason: str | None, upto: int, prompt: bool = False) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "logprobs": logprobs(upto), "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": logprobs(upto, prompt), "finish_reason": reason}
            payload = {**base, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            try:
                if chat:
                    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if include_usage:
                        first["usage"] = None
                    yield f"data: {json.dumps(first)}\n\n"
                upto, echo_pending = 0, echo
                while True:
                    delta, finished, upto = await queue.get()
                    if echo_pending:  # the prompt first: its log-probabilities are known once an update came
                        yield chunk(prompt_text, None, 0, prompt=True)
                        echo_pending = False
                    if delta:
                        yield chunk(delta, None, upto)
                    if finished:
                        break
                if req.finish_reason == "error":
                    err = {"error": {"message": f"generation failed: {req.error}", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                else:
                    yield chunk(None, finish_reason(), upto)
                    if include_usage:
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # the client disconnected mid-stream: give the slot back

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
