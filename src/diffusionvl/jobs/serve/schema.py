"""The OpenAI chat-completions wire format: request validation (pydantic) and response / SSE chunk builders.

Contract:
- `ChatRequest` validates a `/v1/chat/completions` body. Unknown fields are refused (HTTP 400, as OpenAI does);
  OpenAI fields we cannot honour are accepted only at their neutral value (`n=1`, penalties 0, no logprobs).
  Extension fields `decoder`, `block_size`, `steps`, `policy`, `threshold`, `top_k` are `DecodeConfig` fields
  (the `openai` client sends them with `extra_body={...}`); so is `template`, an answer template (literal text and
  `<mask:N>` slots, docs/templates.md) whose answer is the template with its slots filled. Types are strict (JSON
  `true` is not an integer, `"yes"` is not a boolean); `seed` must fit torch's 64-bit generator seed.
- `decode_overrides(body)` -> the `DecodeConfig` fields the request sets; the server's defaults fill the rest.
- `error_body(...)` is the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.
- `completion_body`, `chunk_body`, `sse(...)` build `chat.completion` / `chat.completion.chunk` objects and
  server-sent-event lines. Pure functions of their arguments: no model, no I/O.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffusionvl.core.config import SEED_MAX, SEED_MIN


class _Strict(BaseModel):
    # strict: JSON true is not an integer, "yes" is not a boolean, 1.5 is not an integer (JSON ints still fill floats)
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


def _has_lone_surrogate(value: Any) -> bool:
    """True if any string (key or value) in parsed JSON holds a lone UTF-16 surrogate (not encodable as UTF-8)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields accepted only at the value that changes nothing
    n: int = Field(1, ge=1, le=1)  # an int type: 1.0 is refused like any float where an integer belongs
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logprobs: Literal[False] | None = None
    # diffusionvl extensions (DecodeConfig fields)
    decoder: Literal["block", "ar", "full"] | None = None
    block_size: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    policy: Literal["static", "threshold"] | None = None
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    template: str | None = Field(None, min_length=1)  # an answer template (decoding/template.py)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logprobs", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _literal_types(cls, value: Any, info: Any) -> Any:
        # pydantic matches Literal values by equality, so 0 passed for False and false for 0 (found by schemathesis)
        if info.field_name == "logprobs" and value is not None and not isinstance(value, bool):
            raise ValueError("Input should be false or null")
        if info.field_name != "logprobs" and isinstance(value, bool):
            raise ValueError("Input should be 0 (penalties are not supported)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("a string holds a lone UTF-16 surrogate (like \\ud800), which is not Unicode text")
        return data

    @model_validator(mode="after")
    def _one_limit(self) -> "ChatRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


_DECODE_FIELDS = ("decoder", "block_size", "steps", "policy", "threshold", "temperature", "top_k", "top_p", "seed")


def decode_overrides(body: ChatRequest) -> dict[str, Any]:
    """The DecodeConfig fields this request sets (everything else keeps the server's defaults)."""
    out = {name: getattr(body, name) for name in _DECODE_FIELDS if getattr(body, name) is not None}
    if body.token_limit is not None:
        out["max_new_tokens"] = body.token_limit
    return out


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str, usage: dict[str, int],
                    extension: dict[str, Any]) -> dict[str, Any]:
    """A complete `chat.completion` object (non-streaming answer)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
              "logprobs": None}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage, "system_fingerprint": None, "diffusionvl": extension}


def chunk_body(rid: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta=None` gives the usage-only chunk (empty choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None, **extra}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` (or the literal `[DONE]`) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")
