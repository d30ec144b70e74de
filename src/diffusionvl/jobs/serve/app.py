"""The OpenAI-compatible HTTP API over a `DiffusionVLModel` (FastAPI app factory).

Contract: `create_app(model, config=ServeConfig(), decode=DecodeConfig(), model_name=None)` returns a FastAPI app
with `POST /v1/chat/completions` (JSON or, with `stream: true`, server-sent events: one `chat.completion.chunk`
per finished block, then `data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`. It needs no
socket: tests drive it with `fastapi.testclient` or an httpx ASGI transport; `diffusionvl serve` runs it with
uvicorn. Every error is OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for malformed
JSON, invalid parameters, bad image data, refused image sources and too-long prompts; 404 for an unknown model
or route; 413 for an oversized body; 429 when the decode queue, the tokenizer queue or the pixel budget's waiting
line is full; 503 while shutting down; 500 for bugs. Request handlers validate, load images (in a worker thread,
under the global pixel budget, reduced to the model's size at once), have the prompt rendered and tokenized on the
tokenizer threads (prepare.py), check its length, and relay messages; decoding happens on one thread owned by
`DecodeEngine` (engine.py), which only sees token ids. An answer `template` (the request extension, decoding/
template.py) is checked before the request queues (400: malformed, a control token, beyond the context or
max_tokens) and tokenized on the tokenizer threads; its answer is the template with its slots filled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from starlette.requests import Request

from diffusionvl.backbone.prompts import Conversation, to_conversation
from diffusionvl.backbone.tokens import MAX_CHARS_PER_TOKEN, control_tokens, refuse_control_tokens
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.core.version import __version__
from diffusionvl.decoding.template import budget as template_budget
from diffusionvl.decoding.template import check_fit as check_template_fit
from diffusionvl.decoding.template import parse as parse_template
from diffusionvl.decoding.template import tokenize_text as tokenize_template
from diffusionvl.jobs.serve import openapi, schema
from diffusionvl.jobs.serve.config import ServeConfig
from diffusionvl.jobs.serve.engine import (
    Accepted,
    DecodeEngine,
    Delta,
    Failed,
    Finished,
    PendingRequest,
    QueueFull,
    ShuttingDown,
)
from diffusionvl.jobs.serve.images import ImagePolicy
from diffusionvl.jobs.serve.prepare import PixelBudget, Preparer, image_fit

log = logging.getLogger("diffusionvl.jobs.serve")


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def default_model_name(model: Any) -> str:
    path = str(getattr(model.hf_model.config, "_name_or_path", "") or "").rstrip("/\\")
    return os.path.basename(path) or "diffusionvl"


def check_prompt_size(messages: list[schema.Message], max_prompt_tokens: int | None) -> None:
    """Cheap bounds before tokenizing: message count and text length."""
    if max_prompt_tokens is None:
        return
    check(len(messages) <= max_prompt_tokens, f"too many messages: {len(messages)} (this server allows at most "
                                              f"{max_prompt_tokens} prompt tokens per request)")
    chars = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content
                                                                      if p.type == "text") for m in messages)
    check(chars <= max_prompt_tokens * MAX_CHARS_PER_TOKEN,
          f"the prompt text is {chars} characters, more than {max_prompt_tokens} tokens can hold (this server allows "
          f"at most {max_prompt_tokens} prompt tokens per request)")


def message_texts(messages: list[schema.Message]) -> list[tuple[str, str]]:
    """(where, text) of every text in the request, named by the field the client wrote."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append((f"messages.{i}.content", m.content))
        else:
            out.extend((f"messages.{i}.content.{j}.text", p.text) for j, p in enumerate(m.content) if p.type == "text")
    return out


def build_conversation(messages: list[schema.Message], policy: ImagePolicy, max_images: int,
                       has_vision: bool) -> Conversation:
    """Validated OpenAI messages -> Conversation with its images loaded (refusals raise DiffusionVLError)."""
    n_images = sum(1 for m in messages if not isinstance(m.content, str)
                   for p in m.content if p.type == "image_url")
    check(n_images == 0 or has_vision, "this model takes no images: remove the image_url parts (text-only model)")
    check(n_images <= max_images, f"too many images: {n_images} (this server allows {max_images} per request)")
    out = []
    for m in messages:
        if isinstance(m.content, str):
            content: Any = m.content
        else:
            content = [{"type": "text", "text": p.text} if p.type == "text"
                       else {"type": "image", "image": policy.load(p.image_url.url)} for p in m.content]
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return to_conversation(out)


def resolve_decode(base: DecodeConfig, body: schema.ChatRequest, model_block_size: int,
                   config: ServeConfig) -> DecodeConfig:
    """Server defaults updated with the request's decode fields, validated and bounded by what they may cost
    (DiffusionVLError -> 400): max_tokens, block size (also by max_tokens rounded up to the model's block size: a
    larger block only denoises positions past the budget) and steps."""
    asked = schema.decode_overrides(body)
    budget = -(-(asked.get("max_new_tokens") or base.max_new_tokens) // model_block_size) * model_block_size
    if asked.get("block_size") is not None:
        check(asked["block_size"] <= min(config.max_block_size, max(budget, model_block_size)),
              f"block_size {asked['block_size']} is larger than this request can use (at most "
              f"{min(config.max_block_size, max(budget, model_block_size))}: max_tokens rounded up to the model's block "
              f"size {model_block_size}, and the server's limit {config.max_block_size})")
    if asked.get("steps") is not None:
        check(asked["steps"] <= config.max_steps,
              f"steps {asked['steps']} exceeds this server's limit of {config.max_steps}")
    cfg = dataclasses.replace(base, **asked).resolved(model_block_size)
    check(cfg.max_new_tokens <= config.max_tokens_limit,
          f"max_tokens {cfg.max_new_tokens} exceeds this server's limit of {config.max_tokens_limit}")
    return cfg


class _BodyLimit:
    """ASGI middleware: refuse request bodies larger than `limit` bytes with HTTP 413 (declared or streamed).

    The body is read here, up to the limit, and replayed to the app (which reads it whole anyway)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending everything
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        mib = self.limit / (1 << 20)
        body = schema.error_body(f"request body larger than {mib:g} MiB", code="request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)


def create_app(model: Any, config: ServeConfig | None = None, decode: DecodeConfig | None = None,
               model_name: str | None = None) -> Any:
    """The FastAPI app (module docstring). `decode` holds the server's default decode settings."""
    from fastapi import FastAPI

    cfg = (config or ServeConfig()).validate()
    decode = decode or DecodeConfig()
    decode.resolved(model.config.block_size)  # fail now on bad defaults; keep None = "derive per request"
    state = _State(model, cfg, decode, model_name or cfg.model_name or default_model_name(model))

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.prep.close()
        await asyncio.get_running_loop().run_in_executor(None, state.engine.shutdown)

    app = FastAPI(title="diffusionvl", version=_version(), lifespan=lifespan)
    app.state.diffusionvl = state
    _publish_schema(app, state)
    _install_error_handlers(app)
    _install_routes(app, state)
    app.add_middleware(_BodyLimit, limit=int(cfg.max_request_mb * (1 << 20)))
    return app


def _publish_schema(app: Any, state: "_State") -> None:
    """`GET /openapi.json` serves the schema this server honours (openapi.publish), built once."""
    generate = app.openapi

    def published() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.publish(generate(), state.name, state.config, state.has_vision)
        return app.openapi_schema

    app.openapi = published


def _version() -> str:
    return __version__


class _State:
    def __init__(self, model: Any, config: ServeConfig, decode: DecodeConfig, name: str):
        self.model, self.config, self.decode, self.name = model, config, decode, name
        self.engine = DecodeEngine(model, max_batch=config.max_batch, max_queue=config.max_queue,
                                   batch_wait_s=config.batch_wait_ms / 1000.0, max_active=config.max_active_batches)
        self.has_vision = bool(getattr(model.adapter, "has_vision", False))
        self.pixels = PixelBudget(int(config.max_decoded_megapixels * 1e6), max_waiting=config.max_queue)
        fit = image_fit(model.processor) if self.has_vision else None
        self.images = ImagePolicy.create(config.allow_local_images, config.allow_remote_images,
                                         config.max_image_pixels, fit=fit, hold=self.pixels.hold)
        self.prep = Preparer(model.adapter, threads=config.tokenizer_threads, max_waiting=config.max_queue,
                             max_tokens=config.max_prompt_tokens)
        self.control = control_tokens(model)
        self.created = int(time.time())


def _json_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(schema.error_body(message, kind, param, code), status_code=status, headers=headers)


def _user_path(loc: list[Any], body: Any) -> list[str]:
    """pydantic's error location -> the path of fields the client wrote: union branch labels ("str",
    "list[tagged-union[...]]") and discriminator tags are dropped by walking the body along the location."""
    path, node = [], body
    for k, key in enumerate(loc):
        if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        elif k < len(loc) - 1 or not isinstance(node, dict):  # a branch label, or a field below a wrong type
            continue
        path.append(str(key))
    return path


def _validation_message(errors: list[dict[str, Any]], body: Any = None) -> tuple[str, str | None]:
    """The most specific pydantic error -> (one-line message, dotted parameter path the client wrote)."""
    if not errors:
        return "invalid request body", None
    located = [(_user_path([x for x in e.get("loc", ()) if x != "body"], body), e) for e in errors]
    depth = max(len(p) for p, _ in located)
    deepest = [(p, e) for p, e in located if len(p) == depth]
    path, err = deepest[0]
    param = ".".join(path) or None
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg', ''))}", None
    if err.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if err.get("type") == "missing":
        if param is None:
            return "empty request body: send a JSON object with model and messages", None
        return f"missing required parameter: {param}", param
    messages = list(dict.fromkeys(str(e.get("msg", "invalid value")).removeprefix("Value error, ")
                                  for p, e in deepest if p == path))
    message = messages[0] + "".join(" or " + m.removeprefix("Input should be ") for m in messages[1:])
    return (f"{param}: {message}" if param else f"request body: {message}"), param


def _install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> Any:
        message, param = _validation_message(list(exc.errors()), exc.body)
        return _json_error(400, message, param=param)

    @app.exception_handler(ApiError)
    async def _api(request: Any, exc: ApiError) -> Any:
        return _json_error(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(DiffusionVLError)
    async def _user(request: Any, exc: DiffusionVLError) -> Any:
        return _json_error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Any, exc: HTTPException) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _json_error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Any, exc: Exception) -> Any:
        log.exception("unhandled error")
        return _json_error(500, "internal server error", "server_error")


def _install_routes(app: Any, state: _State) -> None:
    @app.get("/health", responses=openapi.HEALTH_RESPONSES)
    async def health() -> Any:
        engine = state.engine
        body = {"status": "ok" if engine.alive else "unavailable", "model": state.name, "queued": engine.queued,
                "max_queue": engine.max_queue, "running": engine.running, "completed": engine.completed,
                "device": str(state.model.device)}
        if not engine.alive:
            from fastapi.responses import JSONResponse

            return JSONResponse(body, status_code=503)
        return body

    @app.get("/v1/models", responses=openapi.MODELS_RESPONSES)
    async def models() -> Any:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", responses=openapi.MODEL_RESPONSES)
    async def model(model_id: str) -> Any:
        if model_id != state.name:
            raise ApiError(404, f"model {model_id!r} not found; this server serves {state.name!r}",
                           param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/chat/completions", responses=openapi.CHAT_RESPONSES)
    async def chat_completions(body: schema.ChatRequest, http: Request) -> Any:
        return await _chat(state, body, http)


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "diffusionvl",
            "diffusionvl": {"block_size": state.model.config.block_size, "vision": state.has_vision,
                            "max_positions": state.model.max_positions}}


async def _prepare(state: _State, body: schema.ChatRequest, cfg: DecodeConfig) -> PendingRequest:
    """Validated body -> a tokenized request, checked against the prompt limits (module docstring)."""
    from starlette.concurrency import run_in_threadpool

    check_prompt_size(body.messages, state.config.max_prompt_tokens)
    texts = message_texts(body.messages)
    refuse_control_tokens(state.control, texts)
    args = (body.messages, state.images, state.config.max_images, state.has_vision)
    has_images = any(p.type == "image_url" for m in body.messages if not isinstance(m.content, str)
                     for p in m.content)
    conversation = await run_in_threadpool(build_conversation, *args) if has_images else build_conversation(*args)
    then = _template_work(state, body, conversation)
    encoded = await state.prep.encode(conversation, cost=sum(len(text) for _, text in texts), then=then)
    encoded, template = encoded if then is not None else (encoded, None)
    n_prompt = len(encoded.input_ids[0])
    limit = state.config.max_prompt_tokens
    check(n_prompt <= limit, f"the prompt is {n_prompt} tokens (text, images and chat template); this server allows "
                             f"at most {limit} per request")
    if template is not None:
        cfg = _template_budget(state, body, cfg, encoded, template)
    state.model.check_prompt_lengths(encoded.input_ids, cfg.max_new_tokens, cfg.canvas_block)
    return PendingRequest(encoded, n_prompt, cfg, list(body.stop or []), asyncio.get_running_loop(),
                          template=template)


def _template_work(state: _State, body: schema.ChatRequest, conversation: Conversation) -> Any:
    """A malformed answer template is a 400 before the request queues; a sound one is tokenized on the tokenizer
    thread, after the prompt, as the chat template places it (decoding/template.py). None without a template."""
    if body.template is None:
        return None
    text, model = body.template, state.model
    bound = (model.max_positions or 1 << 20) * MAX_CHARS_PER_TOKEN
    check(len(text) <= bound, f"template: longer than {bound} characters, more than the model's context can hold")
    refuse_control_tokens(state.control, [("template", text)])
    parse_template(text, model.max_positions)
    return lambda adapter, _: tokenize_template(text, adapter.tokenizer, model.mask_token_id, model.max_positions,
                                                adapter.render(conversation))


def _template_budget(state: _State, body: schema.ChatRequest, cfg: DecodeConfig, encoded: Any,
                     template: list[int]) -> DecodeConfig:
    """A templated request's budget is its template and closing token (400 when max_tokens is smaller)."""
    check_template_fit(state.model, encoded.input_ids, [template])
    check(body.token_limit is None or body.token_limit >= len(template),
          f"max_tokens {body.token_limit} is less than the template's {len(template)} tokens; raise it or leave it out")
    need = template_budget(template)
    check(need <= state.config.max_tokens_limit,
          f"the template's {len(template)} tokens exceed this server's limit of {state.config.max_tokens_limit}")
    return dataclasses.replace(cfg, max_new_tokens=need)


async def _chat(state: _State, body: schema.ChatRequest, http: Any = None) -> Any:
    if body.model != state.name:
        raise ApiError(404, f"model {body.model!r} not found; this server serves {state.name!r}", param="model",
                       code="model_not_found")
    cfg = resolve_decode(state.decode, body, state.model.config.block_size, state.config)
    try:
        request = await _prepare(state, body, cfg)
        state.engine.submit(request)
    except QueueFull as exc:
        raise ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None
    try:
        first = await request.outbox.get()
        if isinstance(first, Failed):
            raise ApiError(first.status, first.message, first.kind)
        assert isinstance(first, Accepted)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            from starlette.responses import StreamingResponse

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(state, request, rid, created, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(state, request, rid, created, http)
    except BaseException:
        state.engine.cancel(request)
        raise


async def _client_gone(http: Any) -> None:
    """Returns when the client of a non-streaming request disconnects (its body is read: what comes next is that)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _collect(state: _State, request: PendingRequest, rid: str, created: int, http: Any = None) -> Any:
    """The whole answer of a non-streaming request; a client that disconnects first has its request dropped (the
    decoder stops spending blocks on it), as a streaming client's is."""
    gone = asyncio.ensure_future(_client_gone(http)) if http is not None else None
    try:
        while True:
            message = await _next_message(request, gone)
            if message is None:
                state.engine.cancel(request)
                return None  # nobody is there to read an answer
            if isinstance(message, Failed):
                raise ApiError(message.status, message.message, message.kind)
            if isinstance(message, Finished):
                usage = schema.usage_body(message.prompt_tokens, message.completion_tokens)
                return schema.completion_body(rid, created, state.name, message.text, message.finish_reason, usage,
                                              message.stats)
    finally:
        if gone is not None:
            gone.cancel()


async def _next_message(request: PendingRequest, gone: Any) -> Any:
    """The request's next engine message, or None if the client disconnected first."""
    if gone is None:
        return await request.outbox.get()
    getter = asyncio.ensure_future(request.outbox.get())
    done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


async def _stream(state: _State, request: PendingRequest, rid: str, created: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    name = state.name
    try:
        yield schema.sse(schema.chunk_body(rid, created, name, {"role": "assistant", "content": ""}))
        while True:
            message = await request.outbox.get()
            if isinstance(message, Delta):
                yield schema.sse(schema.chunk_body(rid, created, name, {"content": message.text}))
            elif isinstance(message, Finished):
                yield schema.sse(schema.chunk_body(rid, created, name, {}, message.finish_reason,
                                                   diffusionvl=message.stats))
                if include_usage:
                    usage = schema.usage_body(message.prompt_tokens, message.completion_tokens)
                    yield schema.sse(schema.chunk_body(rid, created, name, None, usage=usage))
                break
            elif isinstance(message, Failed):
                yield schema.sse(schema.error_body(message.message, message.kind))
                break
        yield schema.sse("[DONE]")
    finally:
        state.engine.cancel(request)
