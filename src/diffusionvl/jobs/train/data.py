"""Training data files -> validated records -> a dataset that encodes samples lazily and never crashes mid-epoch.

Contract:
- `read_records(path, image_folder, has_vision)` reads a LLaVA JSON list, LLaVA JSONL, or OpenAI-style `messages`
  JSONL (text-only samples may be mixed in) and returns the usable `Record`s plus a `DataReport`. Structural
  problems are found here, before training: a bad JSON line, a sample that is not an object, no conversation, an
  unknown role, no assistant turn, a missing image file, an image file that is truncated, corrupt or over the
  loader's limits (header and integrity checked, media.check_image_file), a remote image, `<image>` markers that do not match the
  images, images for a model without a vision encoder. Each is skipped, counted by kind, and the first few are
  kept as "where: reason" lines. A file that cannot be read at all is one `DiffusionVLError`.
- LLaVA `<image>` markers in a message's text become `{"type": "image"}` parts at that position (one newline next to
  a marker is dropped, as LLaVA does); samples with images but no marker get them in front of the first user turn.
  OpenAI content parts (`text`, `image_url`, `image`) are kept in order. Relative image paths are resolved against
  `image_folder` (default: the data file's folder).
- `SFTDataset[(index, position)]` encodes record `index` (image decoding, chat template, labels: see encode.py).
  Problems only visible then (a corrupt image, a sample too long for `overlong="skip"`) make it take the next
  record instead, deterministically (the same index always yields the same sample), and the returned item lists
  what was skipped so the trainer can count and report it. `position` is the sample's place in its global batch
  (it keys the masking noise) and is passed through.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusionvl.backbone.prompts import ROLE_ALIASES
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.core.media import check_image_bytes, check_image_file, is_file, short

IMAGE_MARKER = "<image>"
MAX_EXAMPLES = 5


class SampleError(Exception):
    """One sample cannot be used; `kind` is the short reason it is counted under."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


@dataclass
class Record:
    """One usable sample: messages with text parts and bare image placeholders, the image sources in order."""

    messages: list[dict[str, Any]]
    images: list[Any]
    where: str


@dataclass
class DataReport:
    """What was read and what was skipped, by reason."""

    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        self.skipped[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {kind}" + (f" ({detail})" if detail else ""))

    def summary(self) -> str:
        line = f"{self.kept} of {self.total} samples usable"
        if self.skipped:
            kinds = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common())
            line += f"; skipped {sum(self.skipped.values())} ({kinds})"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped), "examples": self.examples}


# ---- reading files --------------------------------------------------------------------------------------------
def _load_items(path: Path, report: DataReport) -> list[tuple[str, Any]]:
    """(where, parsed item) for every sample of a JSON list / single object / JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not data
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffusionVLError(f"cannot read data file {path}: {exc}") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise DiffusionVLError(f"data file {path} is not valid JSON: {exc}") from None
        whole = None
    if isinstance(whole, list):
        return [(f"{path.name}[{i}]", item) for i, item in enumerate(whole)]
    if isinstance(whole, dict):
        return [(f"{path.name}:1", whole)]
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path.name}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            report.total += 1
            report.skip("bad JSON line", f"{path.name}:{number}", str(exc))
    return items


def read_records(path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None = None,
                 has_vision: bool = True) -> tuple[list[Record], DataReport]:
    """Read and validate a data file (module docstring)."""
    path = Path(path)
    check(path.is_file(), f"data file not found: {path}")
    base = Path(image_folder) if image_folder is not None else path.parent
    check(base.is_dir(), f"image folder not found: {base}")
    report = DataReport()
    records = []
    for where, item in _load_items(path, report):
        report.total += 1
        try:
            if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
                where = f"{where} (id {item['id']})"
            records.append(to_record(item, where, base, has_vision))
        except SampleError as exc:
            report.skip(exc.kind, where, exc.detail)
    report.kept = len(records)
    return records, report


# ---- one sample -----------------------------------------------------------------------------------------------
def _split_markers(text: str) -> list[dict[str, Any]]:
    """Text with LLaVA `<image>` markers -> text and image parts in order (one newline next to a marker dropped)."""
    pieces = text.split(IMAGE_MARKER)
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if i < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """A message's content -> parts; an inline image part keeps its source under `source`."""
    if isinstance(content, str):
        return _split_markers(content)
    if not isinstance(content, list):
        raise SampleError("bad message", f"content must be a string or a list of parts, got {type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            parts.extend(_split_markers(part))
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.extend(_split_markers(str(part.get("text", ""))))
        elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            src = part.get("image", part.get("image_url", part.get("path", part.get("url"))))
            if isinstance(src, dict):
                src = src.get("url", src.get("path"))
            parts.append({"type": "image", **({"source": src} if src is not None else {})})
        else:
            raise SampleError("bad message", f"unsupported content part {str(part)[:60]!r}")
    return parts


def _messages(item: dict[str, Any]) -> list[dict[str, Any]]:
    raw = item.get("conversations", item.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise SampleError("no conversation", "expected a non-empty 'conversations' or 'messages' list")
    messages = []
    for m in raw:
        if not isinstance(m, dict):
            raise SampleError("bad message", "each message must be an object")
        role = ROLE_ALIASES.get(str(m.get("from", m.get("role", ""))))
        if role is None:
            raise SampleError("unknown role", repr(m.get("from", m.get("role"))))
        content = m.get("value", m.get("content"))
        if content is None:
            raise SampleError("bad message", "a message has no 'value' / 'content'")
        messages.append({"role": role, "content": _content_parts(content)})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no assistant turn", "nothing to learn from")
    if messages[0]["role"] == "assistant":
        raise SampleError("no question", "the first answer comes before any other message (an answer to nothing)")
    if any(p["type"] == "image" for m in messages if m["role"] == "assistant" for p in m["content"]):
        raise SampleError("bad message", "image in an assistant turn")
    return messages


def _record_images(item: dict[str, Any]) -> list[Any]:
    images = item.get("image", item.get("images"))
    if images is None:
        return []
    images = images if isinstance(images, list) else [images]
    return [im.get("url", im.get("path")) if isinstance(im, dict) else im for im in images]


def _assign_images(messages: list[dict[str, Any]], listed: list[Any]) -> list[Any]:
    """Image source of every image part in order; markers take the sample's listed images in order."""
    placeholders = [p for m in messages for p in m["content"] if p["type"] == "image" and "source" not in p]
    inline = any("source" in p for m in messages for p in m["content"] if p["type"] == "image")
    if inline and (listed or placeholders):
        raise SampleError("image count mismatch", "images both inline in the messages and as <image> markers")
    if listed and not placeholders:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("image count mismatch", "images but no user turn to attach them to")
        first_user["content"] = [{"type": "image"} for _ in listed] + first_user["content"]
        placeholders = first_user["content"][: len(listed)]
    if len(placeholders) != len(listed):
        raise SampleError("image count mismatch", f"{len(placeholders)} <image> marker(s) but {len(listed)} image(s)")
    queue = iter(listed)
    sources = []
    for m in messages:
        for p in m["content"]:
            if p["type"] == "image":
                sources.append(p.pop("source") if "source" in p else next(queue))
    return sources


def _resolve(source: Any, base: Path) -> Any:
    if not isinstance(source, str) or not source:
        raise SampleError("bad image", f"unsupported image reference {str(source)[:60]!r}")
    if source.startswith("data:"):
        payload = source.partition(",")[2]
        try:
            check_image_bytes(base64.b64decode(payload, validate=True), "image data URL")
        except (ValueError, binascii.Error):
            raise SampleError("bad image", "image data URL holds invalid base64") from None
        except DiffusionVLError as exc:
            raise SampleError("bad image", str(exc)) from None
        return source
    if source.startswith(("http://", "https://")):
        raise SampleError("remote image", f"download it first: {source[:80]}")
    path = Path(source) if os.path.isabs(source) else base / source
    if not is_file(path):
        raise SampleError("missing image", short(path))
    try:
        check_image_file(path)
    except DiffusionVLError as exc:
        raise SampleError("bad image", str(exc)) from None
    return str(path)


def to_record(item: Any, where: str, base: Path, has_vision: bool = True) -> Record:
    """One parsed sample -> Record, or SampleError with the reason."""
    if not isinstance(item, dict):
        raise SampleError("not an object", f"got {type(item).__name__}")
    messages = _messages(item)
    sources = _assign_images(messages, _record_images(item))
    if sources and not has_vision:
        raise SampleError("images for a text-only model", f"{len(sources)} image(s)")
    return Record(messages, [_resolve(s, base) for s in sources], where)


def split_records(records: list[Record], eval_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic held-out split: a fraction (< 1) or a count (>= 1) of the records goes to eval."""
    n_eval = int(round(eval_size * len(records))) if eval_size < 1 else int(eval_size)
    if n_eval <= 0:
        return records, []
    check(n_eval < len(records), f"eval_size {eval_size} leaves no training samples out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---- the dataset ----------------------------------------------------------------------------------------------
class SFTDataset:
    """Map-style dataset over records; items are encoded on access (see module docstring)."""

    def __init__(self, records: list[Record], encoder: Any, what: str = "training"):
        check(len(records) > 0, f"no usable {what} samples (see the data report above)")
        self.records = records
        self.encoder = encoder
        self._bad: dict[int, str] = {}  # index -> reason, known in this process / worker

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, position = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for step in range(len(self.records)):
            j = (index + step) % len(self.records)
            if j not in self._bad:
                try:
                    sample = self.encoder(self.records[j])
                    return {"sample": sample, "index": j, "position": position, "skipped": skipped}
                except SampleError as exc:
                    self._bad[j] = f"{self.records[j].where}: {exc}"
            skipped.append((j, self._bad[j]))
        raise DiffusionVLError(f"no sample of the data could be encoded; first reason: {skipped[0][1]}")
