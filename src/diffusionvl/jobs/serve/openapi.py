"""The server's published OpenAPI schema (`GET /openapi.json`): what each route takes and answers, exactly.

Contract:
- Response models (`ChatCompletion`, `ModelCard`, `ModelList`, `Health`, `ErrorResponse`) document the answers;
  the routes keep returning the plain dicts that schema.py builds (no per-response validation cost). The schemathesis
  test (tests/test_serve_fuzz.py) checks every answer against them.
- `CHAT_RESPONSES`, `MODEL_RESPONSES`, `HEALTH_RESPONSES`, `MODELS_RESPONSES` are the routes' FastAPI `responses=`.
- `publish(spec, model_name, config)` corrects, in place, the schema FastAPI generated: its automatic 422 is dropped
  (this server answers invalid input with 400, documented per route), `model` is the served id (anything else is a
  404), and the limits a request may not pass are written as maxima: `max_tokens` (`--max-tokens-limit`),
  `block_size` (`--max-block-size`), `steps` (`--max-steps`), `stop` (1 to 4 non-empty strings). Rules across
  fields (steps <= block size, prompt + max_tokens <= context, image bytes that decode) are the server's and
  answered with 400. Request examples (text, streamed, diffusion knobs, and an image for a vision model) are
  included.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from diffusionvl.core.config import SEED_MAX, SEED_MIN
from diffusionvl.jobs.serve.config import ServeConfig


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer: one-line `message`; `param` names the field the client wrote, where there is one."""

    error: ErrorDetail


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DecodeStats(_Open):
    """The `diffusionvl` extension object (docs/serving.md, "Responses")."""

    decoder: Literal["block", "ar", "full"]
    block_size: int
    steps: int
    policy: Literal["static", "threshold"]
    batch_size: int
    forwards: int
    tokens_per_forward: float
    decode_seconds: float
    tokens_per_second: float
    queue_seconds: float


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None
    diffusionvl: DecodeStats


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class ChatCompletionChunk(BaseModel):
    """One streamed event: text deltas; the last choice carries `finish_reason` and `diffusionvl`; a usage-only
    chunk (`choices: []`) follows with `stream_options.include_usage`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: None
    usage: Usage | None = None
    diffusionvl: DecodeStats | None = None


class ModelInfo(BaseModel):
    block_size: int
    vision: bool
    max_positions: int | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    diffusionvl: ModelInfo


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    queued: int
    max_queue: int
    running: int
    completed: int
    device: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_SSE = ("`stream: true`: server-sent events, one `data: {chat.completion.chunk}` per finished block, then "
        "`data: [DONE]`; a failure after the stream started is one `data: {\"error\": ...}` event before it")
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ChatCompletion, "description": "the completion (JSON), or with `stream: true` " + _SSE,
          "content": {"text/event-stream": {}}},  # its schema: _event_stream
    400: _error("malformed JSON, invalid or unknown parameters, bad or refused images, a prompt too long"),
    404: _error("unknown model id (`code: model_not_found`)"),
    413: _error("request body above `--max-request-mb`"),
    429: _error("the decode queue, the tokenizer queue or the pixel budget's waiting line is full (`Retry-After`)"),
    500: _error("a bug (logged with its traceback)"),
    503: _error("the server is shutting down, or its decode thread failed"),
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelCard, "description": "the served model"},
    404: _error("unknown model id (`code: model_not_found`)"),
}
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"model": ModelList, "description": "the served model"}}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Health, "description": "serving"},
    503: {"model": Health, "description": "shutting down, or the decode thread failed (`status: unavailable`)"},
}


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of pydantic's `anyOf: [X, {type: null}]` (or the property itself)."""
    return next((s for s in prop.get("anyOf", []) if s.get("type") != "null"), prop)


def _event_stream(spec: dict[str, Any]) -> None:
    """Each server-sent event of a streamed answer: `data:` holds a chunk or an error as JSON, or `[DONE]` (in
    Open API 3.1 the `schema` of text/event-stream describes one event: {"data", "event", "id", "retry"})."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ChatCompletionChunk, ErrorResponse):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    payload = {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"const": "message"}}}
    ok = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    ok["content"]["text/event-stream"] = {"schema": event}


# a 4 x 4 red PNG: the image example's data URL
_RED_PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP8z4AATAxEcQAz0QEHOoQ+uA"
            "AAAABJRU5ErkJggg==")


def _examples(model_name: str, vision: bool) -> dict[str, Any]:
    """Request examples: documentation, and the cases schemathesis' examples phase sends first."""
    ask = {"model": model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    out = {"text": {"summary": "a short answer", "value": ask},
           "stream": {"summary": "streamed block by block, usage at the end",
                      "value": {**ask, "stream": True, "stream_options": {"include_usage": True}}},
           "diffusion": {"summary": "diffusion knobs (extension fields)",
                         "value": {**ask, "block_size": 4, "steps": 2, "policy": "threshold", "threshold": 0.9,
                                   "stop": ["\n\n"]}}}
    if vision:
        content = [{"type": "image_url", "image_url": {"url": _RED_PNG}}, {"type": "text", "text": "What colour?"}]
        out["image"] = {"summary": "an image (data URL)",
                        "value": {**ask, "messages": [{"role": "user", "content": content}], "stream": True}}
    return out


def publish(spec: dict[str, Any], model_name: str, config: ServeConfig, vision: bool = False) -> dict[str, Any]:
    """FastAPI's generated schema -> the one this server honours (module docstring). Changes `spec` in place."""
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    props = schemas["ChatRequest"]["properties"]
    props["model"]["enum"] = [model_name]
    for field, limit in (("max_tokens", config.max_tokens_limit), ("max_completion_tokens", config.max_tokens_limit),
                         ("block_size", config.max_block_size), ("steps", config.max_steps)):
        _nullable(props[field])["maximum"] = limit
    _nullable(props["seed"]).update(minimum=SEED_MIN, maximum=SEED_MAX)  # exact integers (pydantic writes floats)
    _event_stream(spec)
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    body["examples"] = _examples(model_name, vision)
    one = {"type": "string", "minLength": 1}
    props["stop"] = {"anyOf": [one, {"type": "array", "items": one, "maxItems": 4}, {"type": "null"}],
                     "title": "Stop"}
    return spec
