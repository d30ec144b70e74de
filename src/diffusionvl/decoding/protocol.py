"""The two boundaries of the decoders, as typed protocols: what a decoder needs from the model, and the slot forward.

Contract:
- `DecoderModel` (with its `DecoderAdapter`) is everything decoding/ reads from a model: special ids, device and
  dtype, the prediction alignment, and the adapter's embed / run_decoder / head. `modeling.DiffusionVLModel`
  satisfies it; a test double only needs these members.
- `SlotForward` runs the backbone on the token canvas [N, T] (layout.py) at a `Window` of slots, and reads and
  writes the canvas there. Every decoding loop (block.py, ar.py) and every step (steps.py) is written once against
  it; two classes implement it: `plain.PlainForward` (dynamic shapes: attention reads only the live prefix, steps
  are plain calls) and `static.StaticSession` (static shapes: attention reads the whole canvas, windows are device
  buffers, steps run through a `StepExecutor` that can replay them as CUDA graphs). Both give the same tokens.
- A step closure handed to `run` may change decoding state only through tensors updated in place and the forward's
  own methods (`aim` excepted: the loop aims windows between steps), because a static forward captures it once and
  replays it; the host-side Python in a step runs only at capture there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import torch

from diffusionvl.core.config import DiffusionConfig

Tensor = torch.Tensor
T = TypeVar("T")


class DecoderAdapter(Protocol):
    """The per-architecture pieces a decoder calls (adapters.py)."""

    text_config: Any
    position_dims: int
    image_token_id: int | None

    def input_embeddings(self) -> torch.nn.Module: ...

    def embed(self, input_ids: Tensor, vision: dict[str, Any] | None = None,
              features: Tensor | None = None) -> Tensor: ...

    def image_features(self, vision: dict[str, Any]) -> Tensor: ...

    def layer_residuals(self, input_ids: Tensor, features: Tensor | None) -> Tensor | None: ...

    def head(self, hidden: Tensor) -> Tensor: ...

    def run_decoder(self, embeds: Tensor, mask: Any, positions: Tensor, cache: Any = None,
                    residuals: Tensor | None = None) -> Tensor: ...

    def prompt_positions(self, ids: list[int], vision: dict[str, Any] | None, index: int) -> tuple[Tensor, int]: ...

    def encode(self, conversations: list[Any]) -> Any: ...  # -> adapters.Encoded


class DecoderModel(Protocol):
    """What decoding/ needs from a model (`modeling.DiffusionVLModel`)."""

    adapter: DecoderAdapter
    config: DiffusionConfig  # decoders read `block_size` and `prediction` ("shift" | "same")
    hf_model: torch.nn.Module  # static sessions key their captured graphs on its parameters
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int  # end of answer: block padding in training, closes an answer template (template.py)
    stop_token_ids: list[int]

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...

    def check_prompt_lengths(self, prompts: list[list[int]], max_new_tokens: int,
                             block_size: int | None = None) -> None: ...


@dataclass
class Window:
    """`length` consecutive canvas slots from `start` (as the host last aimed them). A static forward also keeps
    them in `slots` ([length] device buffer, same storage for the session's life), which is what its captured steps
    read; `advance` moves only that copy there."""

    length: int
    start: int = 0
    slots: Tensor | None = None


class SlotForward(Protocol):
    """One backbone forward over canvas slots, and canvas access at windows (module docstring)."""

    tokens: Tensor  # [N, T] the token canvas
    backend: str  # what runs the steps: "plain" or "fast/<eager|graph|compile>"
    notes: list[str]  # fallbacks taken so far (backend.py)

    def window(self, length: int) -> Window: ...

    def aim(self, window: Window, start: int) -> None: ...

    def advance(self, window: Window) -> None:
        """Move the window one slot on (callable inside a step)."""

    def read(self, window: Window) -> Tensor:
        """[N, L] canvas tokens at the window."""

    def write(self, window: Window, values: Tensor) -> None:
        """Canvas tokens at the window := values [N, L]."""

    def rows(self, hidden: Tensor, of: Window, at: Window) -> Tensor:
        """The rows of `hidden` (computed for window `of`) at the slots of window `at` (inside `of`)."""

    def prefill(self, length: int) -> Tensor:
        """Hidden [N, length, D] of slots [0, length), keys cached; run eagerly (dynamic length)."""

    def hidden(self, window: Window) -> Tensor:
        """Hidden [N, L, D] of the canvas tokens at the window; their keys/values are written to the cache there."""

    def plan(self, start: int, end: int) -> None:
        """Hint: the next forwards query slots in [start, end) and may read keys up to `end`."""

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        """Execute the step closure of shape `name` once and return its outputs."""

    def stepper(self, make: Callable[["SlotForward"], T]) -> T:
        """The decoder's step object, made by `make(self)`: once per call, or once per session (static)."""

    def forget_captures(self) -> None:
        """A buffer captured steps read was replaced: capture them again."""
