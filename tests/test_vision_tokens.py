"""The EfficientNet tower's pooled mid-level tokens, the frozen-tower token cache, and the vision gate's probes."""

import copy

import pytest
import torch

from diffusionvl.backbone.vision.cache import TokenCache, tower_fingerprint
from diffusionvl.backbone.vision.encoders import build_tower
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.recipes.vision_gate import TARGETS, gate_markdown, probe_accuracy, probe_scenes


def _tower(**spec):
    torch.manual_seed(0)
    return build_tower({"kind": "efficientnet_lite0", **spec}, pool=4).eval()


def test_mid_level_tokens_have_the_pooled_widths_and_no_final_channels():
    pixels = torch.randn(2, 3, 64, 64)
    tower = _tower(extra_stages=[-1, 0, 2], pooling="avgmaxmin", final=False)
    tokens = tower(pixels)
    assert tokens.shape == (2, 16, 3 * (3 + 16 + 40))
    with_final = _tower(extra_stages=[0], pooling="avgmax")(pixels)
    assert with_final.shape == (2, 16, 1280 + 2 * 16)
    assert tower.output_shape(64) == (16, 3 * (3 + 16 + 40))


def test_pixel_stage_keeps_the_colour_that_a_cell_contains():
    """Stage -1 min/max pooling reads the object's colour even where it fills a small part of the cell."""
    pixels = torch.ones(1, 3, 64, 64)
    pixels[0, :, 4:8, 4:8] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)  # a small red patch in cell (0, 0)
    tokens = _tower(extra_stages=[-1], pooling="avgmaxmin", final=False)(pixels)  # [1, 16, 9]
    mins = tokens[0, :, 6:9]
    assert mins[0, 1] < mins[0, 0] and mins[0, 2] < mins[0, 0]  # green and blue dip in the red cell
    assert torch.allclose(mins[5], mins[6])  # untouched cells look alike


def test_bad_tower_options_are_one_line_errors():
    with pytest.raises(DiffusionVLError, match="pooling"):
        _tower(extra_stages=[0], pooling="median")
    with pytest.raises(DiffusionVLError, match="final"):
        _tower(final=False)
    with pytest.raises(DiffusionVLError, match="out of range"):
        _tower(extra_stages=[-2])


def test_token_cache_returns_the_towers_tokens_and_computes_each_image_once(tmp_path):
    tower = _tower(extra_stages=[-1, 0], pooling="avgmax", final=False)
    for p in tower.parameters():
        p.requires_grad_(False)
    pixels = torch.randn(3, 3, 64, 64)
    expected = tower(pixels)
    calls = []

    def compute(px):
        calls.append(px.shape[0])
        return tower.tokens(px)

    cache = TokenCache(tmp_path / "tokens.pt", tower_fingerprint(tower))
    torch.testing.assert_close(cache(pixels, compute), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache(pixels[[2, 0]], compute), expected[[2, 0]], rtol=1e-4, atol=1e-5)
    assert calls == [3] and cache.stats() == {"images": 3, "hits": 2, "misses": 3}
    cache.save()
    again = TokenCache(tmp_path / "tokens.pt", tower_fingerprint(tower))
    torch.testing.assert_close(again(pixels, compute), expected, rtol=1e-4, atol=1e-5)
    assert calls == [3]  # read from disk


def test_token_cache_ignores_a_file_of_another_tower_or_a_corrupt_one(tmp_path):
    a = _tower(extra_stages=[0], pooling="avg", final=False)
    b = copy.deepcopy(a)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert tower_fingerprint(a) != tower_fingerprint(b)
    pixels = torch.randn(1, 3, 64, 64)
    cache = TokenCache(tmp_path / "t.pt", tower_fingerprint(a))
    cache(pixels, a.tokens)
    cache.save()
    assert TokenCache(tmp_path / "t.pt", tower_fingerprint(b)).entries == {}
    (tmp_path / "t.pt").write_bytes(b"not a torch file")
    assert TokenCache(tmp_path / "t.pt", tower_fingerprint(a)).entries == {}


def test_frozen_tower_uses_its_cache_and_a_trainable_one_does_not(tmp_path):
    tower = _tower(extra_stages=[0], pooling="avg", final=False)
    tower.token_cache = TokenCache(tmp_path / "t.pt", "x")
    pixels = torch.randn(2, 3, 64, 64)
    tower(pixels)
    assert tower.token_cache.misses == 0  # trainable: bypassed
    for p in tower.parameters():
        p.requires_grad_(False)
    tower(pixels)
    tower(pixels)
    assert tower.token_cache.stats() == {"images": 2, "hits": 2, "misses": 2}


def test_probe_scenes_label_what_they_ask_and_probes_learn_a_separable_signal():
    data = probe_scenes(40, seed=1, image_size=64)
    assert set(data.labels) == set(TARGETS) and len(data.images) == 40
    assert all(v >= 0 for v in data.labels["colour"][::2]) and all(v == -1 for v in data.labels["colour"][1::2])
    assert all(0 <= v <= 3 for v in data.labels["count"][1::2])
    torch.manual_seed(0)
    labels = [i % 3 for i in range(120)]
    tokens = torch.randn(120, 4, 5) * 0.1
    for i, y in enumerate(labels):
        tokens[i, i % 4, y] += 3.0  # class signal at a varying position
    assert probe_accuracy(tokens, labels, 60, shared=True) > 0.95
    md = gate_markdown([{"name": "t", "tokens": 4, "width": 5, "linear": {t: 1.0 for t in TARGETS},
                         "mlp": {"count": 1.0}, "passed": True}], 40)
    assert "| t | 4 x 5 | 100.0%" in md and "pass" in md


def test_standardized_tokens_have_zero_mean_and_unit_variance_on_their_statistics_images():
    from diffusionvl.backbone.vision.encoders import ImageTransform, token_statistics

    raw = _tower(extra_stages=[-1, 0], pooling="maxmin", final=False)
    images = probe_scenes(16, seed=3, image_size=64).images
    transform = ImageTransform(size=64)
    stats = token_statistics(raw, transform, images)
    assert len(stats["mean"]) == len(stats["std"]) == 2 * (3 + 16)
    tower = _tower(extra_stages=[-1, 0], pooling="maxmin", final=False, standardize=stats)
    from diffusionvl.backbone.vision.encoders import preprocess_images

    with torch.no_grad():
        toks = tower(preprocess_images(images, transform)).flatten(0, 1)
    assert toks.mean(0).abs().max() < 1e-3
    live = torch.tensor(stats["std"]) > 1e-3
    torch.testing.assert_close(toks.std(0)[live], torch.ones(int(live.sum())), rtol=1e-3, atol=1e-3)
    assert set(tower.state_dict()) == set(raw.state_dict())  # the statistics live in the spec, not the weights


def test_a_standardized_tower_survives_save_and_load(tmp_path):
    """Statistics in the spec (not buffers): a composed model loaded from disk gives the same finite tokens."""
    from conftest import tiny_ar
    from diffusionvl.backbone.compose import compose
    from diffusionvl.backbone.vision import efficientnet
    from diffusionvl.backbone.vision.encoders import ImageTransform, preprocess_images
    from diffusionvl.model.conversion import load
    from diffusionvl.model.modeling import save_atomic
    from diffusionvl.model.wrapping import wrap

    lm, tok = tiny_ar("llama")
    stats = {"mean": [0.1] * 38, "std": [2.0] * 38}
    model, proc = compose(lm, tok, efficientnet.EfficientNetLite0(), pool=2,
                          vision_options={"extra_stages": [-1, 0], "pooling": "maxmin", "final": False,
                                          "standardize": stats})
    dm = wrap(model, proc, block_size=4)
    pixels = preprocess_images(probe_scenes(2, seed=0, image_size=64).images, ImageTransform(size=64))
    with torch.no_grad():
        before = dm.hf_model.vision_tower(pixels)
    save_atomic(dm, tmp_path / "m")
    with torch.no_grad():
        after = load(tmp_path / "m", device="cpu").hf_model.vision_tower(pixels)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before)


def test_binding_queries_ask_unique_shapes_of_multi_object_scenes_and_the_attention_probe_reads_them():
    from diffusionvl.data.scene import SHAPES
    from diffusionvl.recipes.vision_gate import binding_accuracy

    data = probe_scenes(40, seed=1, image_size=64)
    assert data.queries and all(i % 2 == 1 for i, _, _ in data.queries)  # only the multi-object half asks
    for i in {q[0] for q in data.queries}:
        shapes = [s for j, s, _ in data.queries if j == i]
        assert len(shapes) == len(set(shapes)) >= 1
    # Synthetic tokens: each scene has 3 objects on 3 of 6 tokens; a token carries its object's shape and colour in
    # separate channels, so only a probe that looks the shape up and reads the colour *at the same token* succeeds.
    gen = torch.Generator().manual_seed(0)
    n, n_colours = 300, 5
    tokens, queries = torch.randn(n, 6, len(SHAPES) + n_colours, generator=gen) * 0.1, []
    for i in range(n):
        slots = torch.randperm(6, generator=gen)[:3].tolist()
        shapes = torch.randperm(len(SHAPES), generator=gen)[:3].tolist()
        for slot, shape in zip(slots, shapes):
            colour = int(torch.randint(n_colours, (1,), generator=gen))
            tokens[i, slot, shape] += 2.0
            tokens[i, slot, len(SHAPES) + colour] += 2.0
            queries.append((i, shape, colour))
    assert binding_accuracy(tokens, queries, n_train=200, steps=300) > 0.9
    shuffled = [(i, s, c) for (i, s, _), (_, _, c) in zip(queries, queries[1:] + queries[:1])]
    assert binding_accuracy(tokens, shuffled, n_train=200, steps=300) < 0.5  # no signal: near chance
