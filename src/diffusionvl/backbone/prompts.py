"""Normalizing what users pass to `generate` into a batch of conversations with their images.

Contract: `normalize_batch(prompts, images)` accepts a string, a list of strings, one conversation (a list of
OpenAI-style message dicts) or a list of conversations, and per-sample images; it returns one `Conversation` per
sample: messages whose `content` is a list of parts ({"type": "text", "text"} or {"type": "image"}) plus the
loaded images in order of appearance. Image parts may carry the image inline (`image`, `image_url`, `path`);
images passed separately go in front of the first user message's text. Roles "human"/"gpt" (LLaVA) map to
"user"/"assistant".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.media import load_image

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)

    def text_messages(self) -> list[dict[str, str]]:
        """Messages with string content (image parts dropped) for text-only chat templates."""
        return [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
                for m in self.messages]


def _text(text: str) -> dict[str, str]:
    """A text part; text that is not valid Unicode (a lone surrogate: undecodable bytes on the command line, or a
    JSON escape like \\ud800) is refused here, in one line, instead of deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise DiffusionVLError(f"the text holds {bad!r} at character {exc.start}, which is not valid Unicode (bytes "
                               "that are not UTF-8, or a lone surrogate): check the input's encoding") from None
    return {"type": "text", "text": text}


def _parts(content: Any, image_sources: list[Any]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [_text(content)]
    if not isinstance(content, list):
        raise DiffusionVLError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            parts.append(_text(part))
            continue
        if not isinstance(part, dict) or "type" not in part:
            raise DiffusionVLError("each content part must be a dict with a 'type' (text, image or image_url)")
        kind = part["type"]
        if kind == "text":
            parts.append(_text(str(part.get("text", ""))))
        elif kind in ("image", "image_url"):
            src = part.get("image", part.get("image_url", part.get("path", part.get("url"))))
            if src is not None:
                image_sources.append(src)
            parts.append({"type": "image", "_has_source": src is not None})
        else:
            raise DiffusionVLError(f"unsupported content part type {kind!r} (use text, image or image_url)")
    return parts


def to_conversation(item: Any, images: Any = None, *, allow_remote: bool = False) -> Conversation:
    """One sample -> Conversation (see module docstring)."""
    if isinstance(item, str):
        item = [{"role": "user", "content": item}]
    if not isinstance(item, list) or not item or not all(isinstance(m, dict) for m in item):
        raise DiffusionVLError("a prompt must be a non-empty string or a non-empty list of message dicts")
    sources: list[Any] = []
    messages = []
    for m in item:
        role = ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))))
        if role is None:
            raise DiffusionVLError(f"unknown message role {m.get('role', m.get('from'))!r} (use system, user, assistant)")
        messages.append({"role": role, "content": _parts(m.get("content", m.get("value", "")), sources)})
    has_inline = any(p.get("_has_source") for m in messages for p in m["content"] if p["type"] == "image")
    extra = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
    if extra:
        if has_inline:
            raise DiffusionVLError("pass images either inside the messages or with images=..., not both")
        placeholders = [p for m in messages for p in m["content"] if p["type"] == "image"]
        if placeholders:  # bare {"type": "image"} parts: fill them in order
            if len(placeholders) != len(extra):
                raise DiffusionVLError(f"{len(placeholders)} image placeholder(s) but {len(extra)} image(s) given")
        else:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise DiffusionVLError("images need a user message to attach to")
            first_user["content"] = [{"type": "image"} for _ in extra] + first_user["content"]
        sources = extra
    loaded = [load_image(s, allow_remote=allow_remote) for s in sources]
    n_parts = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if n_parts != len(loaded):
        raise DiffusionVLError(f"{n_parts} image part(s) without image data; pass the images with images=...")
    for m in messages:
        for p in m["content"]:
            p.pop("_has_source", None)
    return Conversation(messages, loaded)


def normalize_batch(prompts: Any, images: Any = None, *, allow_remote: bool = False) -> list[Conversation]:
    """Any supported prompt form -> list of Conversations (one per sample)."""
    if isinstance(prompts, Conversation):
        return [prompts]
    single = isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict))
    if single:
        return [to_conversation(prompts, images, allow_remote=allow_remote)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DiffusionVLError("prompts must be a string, a list of strings or a list of conversations")
    if images is None:
        images = [None] * len(prompts)
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        raise DiffusionVLError(f"images must be a list with one entry per prompt ({len(prompts)} prompts)")
    return [p if isinstance(p, Conversation) else to_conversation(p, im, allow_remote=allow_remote)
            for p, im in zip(prompts, images)]
