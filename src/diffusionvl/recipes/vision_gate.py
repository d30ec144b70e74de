"""The vision gate: can a frozen tower's visual tokens tell colour, shape, position and count apart at all?

Run before any language-model training (a model cannot learn to answer what its visual tokens do not carry).

Contract:
- `probe_scenes(n, seed, image_size)` draws `n` synthetic scenes (`data.scene`), half with one object (colour,
  shape, left/right and top/bottom targets; positions closer than 10% of the image to the middle line are not
  asked, as in the QA generator) and half with 1-4 objects (count target). Its `queries` are the binding questions
  of the scenes with 2-4 objects: (scene, shape, colour) for every object whose shape is unique in its scene ("what
  colour is the <shape>?"). Pure function of its arguments.
- `tower_tokens(tower, transform, images)` runs the frozen tower once, in batches, under `torch.inference_mode`.
- `probe_accuracy(tokens, labels, train, test)` fits a linear classifier (multinomial logistic regression on the
  standardized, flattened tokens, weight decay, full-batch L-BFGS) and, with `hidden > 0`, a one-hidden-layer MLP,
  on the train indices, and returns accuracy on the held-out test indices. Deterministic given the seed.
- `binding_accuracy(tokens, queries, n_train)` fits a one-head attention probe (a learned query per shape attends
  over the linearly mapped tokens, plus a position vector per token; the attended value -> colour) on the queries of
  the first `n_train` scenes and returns held-out accuracy: can the tokens tell *which* colour belongs to *which*
  shape when several objects share the image, the lookup a language model must learn. Deterministic given the seed.
- `run_gate(specs, ...)` evaluates each candidate tower spec and returns one row per spec with accuracy per target;
  `gate_passed(row)` applies the bars (linear colour and shape >= 95%, position >= 90%, binding >= 90%).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from diffusionvl.data.scene import COLOURS, SHAPES, Scene, render_scene, sample_scene

TARGETS = ("colour", "shape", "position_x", "position_y", "count")
BARS = {"colour": 0.95, "shape": 0.95, "position_x": 0.90, "position_y": 0.90}
BINDING_BAR = 0.90
SHARED = ("colour", "shape", "count")  # what an object is: token-shared probe; where it is: flattened probe
_MARGIN = 0.10


@dataclass
class ProbeSet:
    images: list[Any]
    labels: dict[str, list[int]]  # target -> class per scene, -1 where the scene does not ask it
    queries: list[tuple[int, int, int]]  # (scene, shape, colour) binding questions of the multi-object scenes


def probe_scenes(n: int, seed: int, image_size: int = 224) -> ProbeSet:
    rng = random.Random(f"diffusionvl-vision-gate/{seed}")
    colours, labels = sorted(COLOURS), {t: [] for t in TARGETS}
    images, queries = [], []
    for i in range(n):
        single = i % 2 == 0
        scene = sample_scene(rng, image_size)
        while single and len(scene.objects) != 1:
            scene = sample_scene(rng, image_size)
        images.append(render_scene(scene))
        for target, value in _targets(scene, single, colours).items():
            labels[target].append(value)
        shapes = [obj.shape for obj in scene.objects]
        queries += [(i, SHAPES.index(obj.shape), colours.index(obj.colour)) for obj in scene.objects
                    if len(shapes) > 1 and shapes.count(obj.shape) == 1]
    return ProbeSet(images, labels, queries)


def _targets(scene: Scene, single: bool, colours: list[str]) -> dict[str, int]:
    out = {t: -1 for t in TARGETS}
    if not single:
        out["count"] = len(scene.objects) - 1
        return out
    obj, mid, margin = scene.objects[0], scene.size / 2, _MARGIN * scene.size
    out["colour"], out["shape"] = colours.index(obj.colour), SHAPES.index(obj.shape)
    if abs(obj.x - mid) >= margin:
        out["position_x"] = int(obj.x > mid)
    if abs(obj.y - mid) >= margin:
        out["position_y"] = int(obj.y > mid)
    return out


@torch.inference_mode()
def tower_tokens(tower: torch.nn.Module, transform: Any, images: Sequence[Any], batch: int = 32) -> torch.Tensor:
    from diffusionvl.backbone.vision.encoders import preprocess_images

    tower.eval()
    out = [tower(preprocess_images(list(images[i:i + batch]), transform)).float() for i in range(0, len(images), batch)]
    return torch.cat(out)  # [N, T, C]


def probe_accuracy(tokens: torch.Tensor, labels: Sequence[int], n_train: int, hidden: int = 0,
                   weight_decay: float = 1e-3, seed: int = 0, shared: bool = False) -> float:
    """Accuracy on the scenes after the first `n_train` (held out) of a probe fit on the first `n_train`.

    shared=False: one weight per token and channel (flattened tokens: can tell *where*). shared=True: the same
    weights for every token, read through the tokens' mean and maximum (what a projector shared across positions,
    then attention, sees: tells *what*, wherever it is)."""
    y = torch.tensor(labels)
    x = torch.cat([tokens.mean(1), tokens.amax(1)], 1) if shared else tokens.flatten(1)
    keep = y >= 0
    idx = torch.arange(len(y))
    tr, te = idx[keep & (idx < n_train)], idx[keep & (idx >= n_train)]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    n_classes = int(y[keep].max()) + 1
    torch.manual_seed(seed)
    if hidden:
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, n_classes))
    else:
        model = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=100, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x[tr]), y[tr])
        loss = loss + weight_decay * sum(p.pow(2).sum() for n, p in model.named_parameters() if "weight" in n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((model(x[te]).argmax(-1) == y[te]).float().mean())


class _BindingProbe(torch.nn.Module):
    def __init__(self, n_tokens: int, width: int, n_shapes: int, n_colours: int, dim: int = 128):
        super().__init__()
        self.embed = torch.nn.Linear(width, dim)
        self.position = torch.nn.Parameter(torch.zeros(n_tokens, dim))
        self.query = torch.nn.Embedding(n_shapes, dim)
        self.key, self.value = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, n_colours)

    def forward(self, tokens: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position  # [N, T, D]
        scores = torch.einsum("nd,ntd->nt", self.query(shape), self.key(h)) / h.shape[-1] ** 0.5
        return self.out(torch.einsum("nt,ntd->nd", scores.softmax(-1), self.value(h)))


def binding_accuracy(tokens: torch.Tensor, queries: Sequence[tuple[int, int, int]], n_train: int, steps: int = 600,
                     batch: int = 256, seed: int = 0) -> float:
    """Held-out accuracy of the attention probe (module contract) on the queries of scenes >= `n_train`."""
    q = torch.tensor(list(queries), dtype=torch.long).reshape(-1, 3)
    scene, shape, colour = q.unbind(1)
    train, test = torch.nonzero(scene < n_train).squeeze(1), torch.nonzero(scene >= n_train).squeeze(1)
    if len(train) == 0 or len(test) == 0:
        return float("nan")
    mean, std = tokens[: n_train].mean((0, 1)), tokens[: n_train].std((0, 1)).clamp_min(1e-6)
    x = (tokens - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = _BindingProbe(x.shape[1], x.shape[2], len(SHAPES), int(colour.max()) + 1)
    opt = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
    batch = min(batch, len(train))
    with torch.enable_grad():
        for _ in range(steps):
            b = train[torch.randint(len(train), (batch,), generator=gen)]
            loss = F.cross_entropy(probe(x[scene[b]], shape[b]), colour[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe(x[scene[test]], shape[test]).argmax(-1) == colour[test]).float().mean())


def gate_passed(row: dict[str, Any]) -> bool:
    binding = row.get("attention", {}).get("binding")
    measured = binding is not None and binding == binding  # NaN: too few multi-object scenes to ask any question
    return all(row["linear"][t] >= bar for t, bar in BARS.items()) and (not measured or binding >= BINDING_BAR)


def candidate_tower(cand: dict[str, Any]) -> tuple[Any, Any]:
    """(frozen pretrained EfficientNet-Lite0 tower, its preprocessing) of a gate candidate."""
    from dataclasses import replace

    from diffusionvl.backbone.vision.encoders import build_tower, resolve_vision

    source = resolve_vision("efficientnet_lite0")
    tower = build_tower({**source.spec, **cand.get("vision_options", {})}, cand.get("pool"))
    tower.encoder.load_state_dict(tower.loadable_state(source.state))
    return tower, replace(source.transform, crop_pct=cand.get("crop_pct", source.transform.crop_pct))


def run_gate(specs: list[dict[str, Any]], n_scenes: int = 2400, seed: int = 0, image_size: int = 224,
             test_fraction: float = 0.5, mlp_hidden: int = 256, progress: bool = True) -> list[dict[str, Any]]:
    """One row per candidate: {"spec", "tokens", "width", "linear": {target: acc}, "mlp": {...}, "passed"}.

    A candidate is {"name", "vision_options" (tower spec fields), "pool", "crop_pct"}."""
    from tqdm import tqdm

    data = probe_scenes(n_scenes, seed, image_size)
    n_train = int(round(n_scenes * (1 - test_fraction)))
    rows = []
    for cand in tqdm(specs, desc="vision gate", unit="tower", disable=not progress):
        tokens = tower_tokens(*candidate_tower(cand), data.images)
        row = {"name": cand["name"], "candidate": cand, "tokens": tokens.shape[1], "width": tokens.shape[2],
               "linear": {t: probe_accuracy(tokens, data.labels[t], n_train, seed=seed, shared=t in SHARED)
                          for t in TARGETS},
               "mlp": {"count": probe_accuracy(tokens, data.labels["count"], n_train, hidden=mlp_hidden, seed=seed)},
               "attention": {"binding": binding_accuracy(tokens, data.queries, n_train, seed=seed)}}
        row["passed"] = gate_passed(row)
        rows.append(row)
    return rows


def gate_markdown(rows: list[dict[str, Any]], n_scenes: int, test_fraction: float = 0.5) -> str:
    head = (f"Linear probes on the frozen tower's tokens ({n_scenes} synthetic scenes, {int(test_fraction * 100)}% held "
            "out; colour/shape/position on one-object scenes, count on 1-4 objects; binding: 'what colour is the "
            "<shape>?' in scenes with 2-4 objects, one-head attention probe):\n\n"
            "| tower | tokens x width | colour | shape | left/right | top/bottom | count (linear) | count (MLP) | "
            "binding (attention) | gate |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['name']} | {r['tokens']} x {r['width']} | " + " | ".join(
        f"{100 * r['linear'][t]:.1f}%" for t in TARGETS) + f" | {100 * r['mlp']['count']:.1f}% | "
        f"{_percent(r.get('attention', {}).get('binding'))} | {'pass' if r['passed'] else 'fail'} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"
