"""lmms-eval adapter: run lmms-eval benchmarks (MME, MMMU, ...) on a diffusionvl model, as a plugin.

Contract:
- Registration: lmms-eval (>= 0.7) reads the entry-point group `lmms_eval.models`; our `pyproject.toml` points
  `diffusionvl` there at `manifests()`, which returns a `ModelManifest` for the simple model class
  `DiffusionVLLmms`. Usage:
      lmms-eval eval --model diffusionvl --model_args pretrained=out/dvl,steps=4,policy=threshold --tasks mme
  `model_args` other than `pretrained`, `device`, `dtype`, `batch_size`, `system_prompt`, `elbo_levels` are
  `DecodeConfig` fields (decoder, block_size, steps, policy, threshold, max_new_tokens, ...); unknown ones fail.
- Conversion (pure, no lmms-eval import, tested with fake requests): a `generate_until` request's args
  `(context, gen_kwargs, doc_to_visual, doc_id, task, split)` become one conversation (`to_messages`: the images
  in place of `<image>` placeholders, else in front of the text) and a `DecodeConfig` (`decode_options`:
  max_new_tokens, temperature / do_sample, top_p, top_k; beam search is refused), and the answer is cut at the
  first `until` string. Requests are grouped by identical gen_kwargs and decoded `batch_size` at a time; results
  come back in request order. Multi-round generation is refused.
- Scores: a `loglikelihood` request `(context, continuation, doc_to_visual, doc_id, task, split)` returns
  (loss, is_greedy) in lmms-eval's convention, lower is better (0.7.x picks a multiple-choice answer with
  `np.argmin`): loss = the NELBO of the continuation as the assistant turn, in nats, summed over its tokens. A
  diffusion model has no exact likelihood; NELBO >= -log p(continuation | context), so -loss is a lower bound on
  the AR-style log-likelihood, and with B = 1 it estimates the AR negative log-likelihood itself. It is estimated
  at `elbo_levels` noise levels with the same seeded masking draws for every request. is_greedy: greedy decoding
  of the prompt reproduces the continuation.
- Shims for lmms-eval 0.7.3 bugs, each removable when tests/test_lmms_eval_harness.py says the bug is gone:
  its `unwrap_generation_output` turns a (loss, is_greedy) pair into a string, so `DiffusionVLLmms.loglikelihood`
  hands the pairs over wrapped in `GenerationResult`s, which it unwraps untouched (`_survive_unwrap`);
  `lmms-eval models` lists only its built-in table, so `manifests()` adds `diffusionvl` to that table too.
- `GenerationRunner` does the work without lmms-eval; `DiffusionVLLmms` (defined only when lmms-eval is
  importable) is the thin `lmms` subclass lmms-eval instantiates.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator, Sequence

from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError

MODEL_ID = "diffusionvl"
CLASS_PATH = "diffusionvl.jobs.integrations.lmms_eval.DiffusionVLLmms"
IMAGE_PLACEHOLDER = "<image>"


def manifests() -> list[Any]:
    """Entry-point payload for lmms-eval's model registry (group `lmms_eval.models`).

    lmms-eval calls this while `lmms_eval.models` initializes; `lmms-eval models` prints that module's built-in
    `AVAILABLE_SIMPLE_MODELS` table, not the registry, so the model is listed there too (shim, module docstring).
    """
    import sys

    from lmms_eval.models.registry_v2 import ModelManifest

    listing = getattr(sys.modules.get("lmms_eval.models"), "AVAILABLE_SIMPLE_MODELS", None)
    if isinstance(listing, dict):
        listing.setdefault(MODEL_ID, CLASS_PATH)
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def flatten_visuals(visuals: Any) -> list[Any]:
    """doc_to_visual's output (None, an image, nested lists of images) -> flat list of PIL images."""
    from PIL import Image

    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals]
    if isinstance(visuals, (list, tuple)):
        return [im for v in visuals for im in flatten_visuals(v)]
    raise DiffusionVLError(f"unsupported visual input {type(visuals).__name__} (only still images are supported; "
                           "video and audio tasks are not)")


def to_messages(context: str, images: Sequence[Any], system: str | None = None) -> list[dict[str, Any]]:
    """One lmms-eval context + images -> an OpenAI-style message list for `model.generate`."""
    pieces = context.split(IMAGE_PLACEHOLDER)
    placed = min(len(pieces) - 1, len(images))
    content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images[placed:]]  # unplaced: in front
    for k, piece in enumerate(pieces):
        if k > 0 and k - 1 < placed:
            content.append({"type": "image", "image": images[k - 1]})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    if not any(p["type"] == "text" for p in content):
        content.append({"type": "text", "text": ""})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def decode_options(gen_kwargs: dict[str, Any] | None, base: DecodeConfig) -> tuple[DecodeConfig, list[str]]:
    """lmms-eval gen_kwargs -> (DecodeConfig, until strings)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    if int(kw.get("num_beams", 1) or 1) != 1:
        raise DiffusionVLError("beam search (num_beams > 1) is not supported by diffusion decoding")
    updates: dict[str, Any] = {}
    if kw.get("max_new_tokens") is not None:
        updates["max_new_tokens"] = int(kw["max_new_tokens"])
    if kw.get("do_sample") is False:
        updates["temperature"] = 0.0
    elif kw.get("temperature") is not None:
        updates["temperature"] = float(kw["temperature"])
    if kw.get("top_p") is not None:
        updates["top_p"] = float(kw["top_p"])
    if kw.get("top_k") is not None:
        updates["top_k"] = int(kw["top_k"])
    return dataclasses.replace(base, **updates).validate(), [u for u in until if u]


def cut_until(text: str, until: Sequence[str]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def _kwargs_key(gen_kwargs: Any) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


class GenerationRunner:
    """lmms-eval requests -> diffusionvl calls (module docstring). `task_dict[task][split][doc_id]` is the doc."""

    def __init__(self, model: Any, decode: DecodeConfig | None = None, batch_size: int = 1,
                 system_prompt: str | None = None, elbo_levels: int = 8):
        self.model = model
        self.decode = decode or DecodeConfig()
        self.batch_size = max(int(batch_size), 1)
        self.system_prompt = system_prompt
        self.elbo_levels = elbo_levels

    def _visuals(self, doc_to_visual: Any, task_dict: dict[str, Any], doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        return flatten_visuals(doc_to_visual(task_dict[task][split][doc_id]))

    def _groups(self, requests: Sequence[Any]) -> Iterator[tuple[Any, list[int]]]:
        """(gen_kwargs, request indices) per identical gen_kwargs, in first-seen order, in batch_size chunks."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(_kwargs_key(req.args[1]), []).append(i)
        for indices in groups.values():
            for k in range(0, len(indices), self.batch_size):
                yield requests[indices[0]].args[1], indices[k:k + self.batch_size]

    def generate_until(self, requests: Sequence[Any], task_dict: dict[str, Any], progress: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=not progress, desc="diffusionvl generate_until")
        for gen_kwargs, indices in self._groups(requests):
            cfg, until = decode_options(gen_kwargs, self.decode)
            batch = []
            for i in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                images = self._visuals(doc_to_visual, task_dict, doc_id, task, split)
                batch.append(to_messages(context, images, self.system_prompt))
            out = self.model.generate(batch, config=cfg)
            for i, text in zip(indices, out.texts):
                results[i] = cut_until(text, until)
            bar.update(len(indices))
        bar.close()
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: Sequence[Any], task_dict: dict[str, Any],
                      progress: bool = False) -> list[tuple[float, bool]]:
        """(NELBO of the continuation in nats, whether greedy decoding produces it) per request: a loss."""
        import torch
        from tqdm.auto import tqdm

        from diffusionvl.jobs.evaluation.elbo import encode_scored, nelbo, noise_levels
        from diffusionvl.jobs.evaluation.tasks import Sample

        if any(len(r.args) < 6 for r in requests):  # the unconditional (context-free) requests of acc_mutual_info
            raise DiffusionVLError("the acc_mutual_info metric is not supported (lmms-eval 0.7 ranks its loss "
                                   "differences with argmax, the wrong way round for a loss); use acc / acc_norm")
        levels = noise_levels(self.elbo_levels)
        generator = torch.Generator(device=self.model.device)
        out = []
        for context, target, doc_to_visual, doc_id, task, split in tqdm(
                [r.args[:6] for r in requests], disable=not progress, desc="diffusionvl loglikelihood"):
            continuation = target if isinstance(target, str) else target(task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, task_dict, doc_id, task, split)
            sample = Sample(0, "0", context.replace(IMAGE_PLACEHOLDER, "").strip() or " ", [continuation])
            batch = encode_scored(self.model, [sample], include_end=False, images=[images])
            generator.manual_seed(0)  # the same masking draws for every request: identical requests score the same
            total, count = nelbo(self.model, batch, levels, generator)
            greedy = self.model.generate(to_messages(context, images, self.system_prompt),
                                         config=dataclasses.replace(self.decode, temperature=0.0,
                                                                    max_new_tokens=max(int(count[0]), 1)))
            out.append((float(total[0]), greedy.texts[0].strip() == continuation.strip()))
        return out


def _decode_from_kwargs(kwargs: dict[str, Any]) -> DecodeConfig:
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise DiffusionVLError(f"unknown diffusionvl model_args: {', '.join(unknown)} "
                               f"(decode options: {', '.join(sorted(known))})")
    return DecodeConfig(**kwargs).validate()


try:  # the lmms class exists only where lmms-eval is installed (an optional extra, never vendored)
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent
    _LmmsBase = None


def unwrap_keeps_pairs() -> bool:
    """Whether lmms-eval's evaluator passes a (loss, is_greedy) pair through to the task's scoring unchanged."""
    return unwrap_generation_output((1.5, True))[0] == (1.5, True)


def _survive_unwrap(pairs: list[tuple[float, bool]]) -> list[Any]:
    """The pairs in a form lmms-eval's `unwrap_generation_output` returns untouched (shim, module docstring)."""
    if unwrap_keeps_pairs():
        return pairs
    return [GenerationResult(text=pair) for pair in pairs]  # type: ignore[arg-type]  # .text is handed on as is


if _LmmsBase is not None:

    class DiffusionVLLmms(_LmmsBase):  # type: ignore[misc, valid-type]
        """lmms-eval model `diffusionvl` (simple model: contexts + doc_to_visual)."""

        is_simple = True

        def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                     batch_size: int | str = 1, system_prompt: str | None = None, elbo_levels: int = 8,
                     **decode_kwargs: Any):
            super().__init__()
            import torch
            from accelerate import Accelerator

            from diffusionvl.model.conversion import load

            accelerator = Accelerator()
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            if self._world_size > 1 or (device is None and torch.cuda.is_available()):
                device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self.model = load(pretrained, device=device, dtype=dtype)
            size = 1 if str(batch_size) == "auto" else int(batch_size)
            self.runner = GenerationRunner(self.model, _decode_from_kwargs(decode_kwargs), size, system_prompt,
                                           int(elbo_levels))

        def generate_until(self, requests: list[Any]) -> list[str]:
            return self.runner.generate_until(requests, self.task_dict, progress=self.rank == 0)

        def loglikelihood(self, requests: list[Any]) -> list[Any]:
            return _survive_unwrap(self.runner.loglikelihood(requests, self.task_dict, progress=self.rank == 0))

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("diffusionvl does not support multi-round generation tasks yet")
