"""The shapes dataset (determinism, captions, scene rules) and its judge (accuracy on clean and
degraded renders, rejection of wrong captions, bad input)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from parti.data.shapes import (
    BACKGROUNDS,
    COLORS,
    EXTENTS,
    MIN_RENDER_SIZE,
    POSITION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    describe,
    generate,
    object_geometry,
    parse_caption,
    render,
    sample_rng,
    sample_scene,
    scene_from_meta,
    shape_coverage,
)
from parti.eval.shapes_judge import detect_objects, judge, judge_batch

Degrade = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@pytest.fixture(scope="module")
def samples() -> list[tuple[Scene, np.ndarray]]:
    """500 generated (scene, image) pairs shared by the judge tests."""
    return [(scene_from_meta(meta), image) for _, image, _, meta in generate(500, seed=11)]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), (1.0, 1.0, 0.0)))


def _jpeg(image: np.ndarray, rng: np.random.Generator, quality: int = 30) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)  # 8x8 DCT blocks, 4:2:0 chroma
    return np.asarray(Image.open(buffer).convert("RGB"))


def _blocks(factor: int, resample: Image.Resampling) -> Degrade:
    """Average factor x factor blocks, then upsample back: blocky tokenizer-like artefacts."""

    def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        side = image.shape[0]
        small = image.astype(np.float32).reshape(
            side // factor, factor, side // factor, factor, 3
        ).mean(axis=(1, 3))  # (side / factor, side / factor, 3)
        return np.asarray(Image.fromarray(_to_uint8(small)).resize((side, side), resample))

    return degrade


def _colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A global shift of up to 20 levels per channel plus a blurred, misregistered red channel."""
    shifted = image.astype(np.float32) + rng.uniform(-20, 20, size=3)
    halo = ndimage.gaussian_filter(shifted[..., 0], 1.5)
    shifted[..., 0] = np.roll(halo, 1, axis=1)
    return _to_uint8(shifted)


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image + rng.normal(0.0, 12.0, image.shape))


def _combined(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _noise(_jpeg(_colour(_blur(image, rng), rng), rng, quality=50), rng)


def _agreement(samples: list[tuple[Scene, np.ndarray]], degrade: Degrade) -> dict[str, float]:
    rng = np.random.default_rng(0)
    return judge_batch([degrade(image, rng) for _, image in samples],
                       [caption(scene) for scene, _ in samples])


# ---------------------------------------------------------------------------------- dataset


def test_vocabulary_is_well_separated() -> None:
    colours = np.array(list(COLORS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    between = np.linalg.norm(colours[:, None] - colours[None], axis=2)
    assert between[~np.eye(len(colours), dtype=bool)].min() >= 90
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=2).min() >= 110
    assert len(SHAPES) >= 4 and len(POSITION_PHRASES) == 9
    assert EXTENTS["small"] * 64 >= 14  # survives 8x8 patches at 64 px


def test_generate_is_deterministic_and_resumable() -> None:
    first = list(generate(12, seed=3))
    again = list(generate(12, seed=3))
    tail = list(generate(4, seed=3, start=8))
    for (k1, im1, c1, m1), (k2, im2, c2, m2) in zip(first, again):
        assert (k1, c1, m1) == (k2, c2, m2) and np.array_equal(im1, im2)
    for (k1, im1, c1, _), (k2, im2, c2, _) in zip(first[8:], tail):
        assert (k1, c1) == (k2, c2) and np.array_equal(im1, im2)
    other = list(generate(12, seed=4))
    assert [c for _, _, c, _ in other] != [c for _, _, c, _ in first]
    assert len({key for key, _, _, _ in first + other}) == 24
    image = first[0][1]
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert next(generate(1, seed=3, size=96))[1].shape == (96, 96, 3)


def test_meta_is_json_and_describes_the_scene() -> None:
    for _, image, text, meta in generate(50, seed=5):
        scene = scene_from_meta(json.loads(json.dumps(meta)))
        assert caption(scene) == text
        assert np.array_equal(render(scene), image)


def test_caption_round_trip() -> None:
    for index in range(1000):
        scene = sample_scene(sample_rng(9, index))
        assert parse_caption(caption(scene)) == describe(scene)


def test_parse_caption_variants() -> None:
    spec = parse_caption("  A Small ORANGE Triangle at the bottom right.  ")
    assert spec.objects[0].color == "orange" and spec.objects[0].cell == (2, 2)
    assert spec.objects[0].size == "small" and spec.background is None
    spec = parse_caption("a red circle above a blue square")
    assert spec.relation == "above" and [o.shape for o in spec.objects] == ["circle", "square"]
    spec = parse_caption("a green diamond")
    assert spec.objects[0].size is None and spec.objects[0].cell is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a pink circle at the top", "unknown word"),
        ("a red hexagon", "unknown word"),
        ("circle red a", "expected order"),
        ("a red circle to the left of", "expected order"),
        ("", "cannot parse"),
    ],
)
def test_bad_caption_is_a_clear_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_caption(text)
    with pytest.raises(ValueError, match=message):
        judge(np.zeros((64, 64, 3), np.uint8), text)


def test_bad_scene_and_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        ShapeObject("hexagon", "red", "small", (0, 0))
    with pytest.raises(ValueError, match="cell"):
        ShapeObject("circle", "red", "small", (0, 3))
    obj = ShapeObject("circle", "red", "small", (0, 0))
    with pytest.raises(ValueError, match="relation"):
        Scene((obj, replace(obj, cell=(2, 2))), "gray", None)
    with pytest.raises(ValueError, match="render size"):
        render(Scene((obj,), "gray", None), size=MIN_RENDER_SIZE - 1)
    with pytest.raises(ValueError, match="seed"):
        next(generate(1, seed=-1))


def test_scenes_follow_their_rules() -> None:
    side, seen = 64, set()
    xs, ys = np.arange(side)[None, :] + 0.5, np.arange(side)[:, None] + 0.5
    for index in range(1500):
        scene = sample_scene(sample_rng(1, index))
        seen.update({scene.relation, scene.background})
        seen.update(v for obj in scene.objects for v in (obj.shape, obj.color, obj.size, obj.cell))
        geometry = [object_geometry(obj, side) for obj in scene.objects]
        for cx, cy, extent in geometry:  # fully inside the image
            assert extent / 2 <= min(cx, cy, side - cx, side - cy)
        if scene.relation is None:
            continue
        a, b = scene.objects
        assert (a.shape, a.color) != (b.shape, b.color)
        dx, dy = geometry[1][0] - geometry[0][0], geometry[1][1] - geometry[0][1]
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx),
                         "below": (-dy, dx)}[scene.relation]
        assert along > abs(across) and along >= 0.25 * side
        masks = [shape_coverage(o.shape, *g, xs, ys) > 0 for o, g in zip(scene.objects, geometry)]
        assert not (ndimage.binary_dilation(masks[0], iterations=3) & masks[1]).any()
    vocabulary = {*SHAPES, *COLORS, *BACKGROUNDS, *SIZES, *RELATIONS, *POSITION_PHRASES, None}
    assert seen == vocabulary


# ------------------------------------------------------------------------------------ judge


def test_judge_agrees_with_ground_truth(samples: list[tuple[Scene, np.ndarray]]) -> None:
    scores = _agreement(samples, lambda image, rng: image)
    assert set(scores) == {"color", "shape", "size", "position", "relation", "background",
                           "count", "all"}
    assert min(scores.values()) >= 0.99, scores


@pytest.mark.parametrize(
    "degrade",
    [_blur, _jpeg, _blocks(2, Image.Resampling.NEAREST), _blocks(2, Image.Resampling.BILINEAR),
     _colour, _noise, _combined],
    ids=["blur1", "jpeg30", "blocks2-nearest", "blocks2-bilinear", "colour", "noise12",
         "combined"],
)
def test_judge_is_robust_to_degradation(
    samples: list[tuple[Scene, np.ndarray]], degrade: Degrade
) -> None:
    scores = _agreement(samples[:300], degrade)
    assert scores["all"] >= 0.95, scores


@pytest.mark.parametrize(
    "resample", [Image.Resampling.NEAREST, Image.Resampling.BILINEAR], ids=["nearest", "bilinear"]
)
def test_judge_under_4x_blocks(
    samples: list[tuple[Scene, np.ndarray]], resample: Image.Resampling
) -> None:
    """64 -> 16 px leaves a small object 3.5 px wide: colour, count and position survive, large
    shapes too; a small diamond and a small circle become hard to tell apart."""
    scores = _agreement(samples[:300], _blocks(4, resample))
    assert min(scores["color"], scores["count"], scores["position"], scores["relation"]) >= 0.97
    assert scores["all"] >= 0.8, scores


def _mutations(scene: Scene, key: str, rng: np.random.Generator) -> Scene | None:
    """The scene with one stated fact changed so that `key` must fail, or None if not stated."""
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if key == "relation":
        if scene.relation is None:
            return None
        others = [r for r in RELATIONS if r != scene.relation]
        return replace(scene, relation=others[rng.integers(len(others))])
    if key == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return replace(scene, background=others[rng.integers(len(others))])
    if key in ("size", "position") and scene.relation is not None:
        return None
    field, choices = {"color": ("color", list(COLORS)), "shape": ("shape", list(SHAPES)),
                      "size": ("size", list(SIZES)),
                      "position": ("cell", list(POSITION_PHRASES))}[key]
    others = [c for c in choices if c != getattr(obj, field)]
    changed = replace(obj, **{field: others[rng.integers(len(others))]})
    return replace(scene, objects=tuple(changed if i == index else o
                                        for i, o in enumerate(scene.objects)))


@pytest.mark.parametrize("degrade", [None, _combined], ids=["clean", "combined"])
@pytest.mark.parametrize("key", ["color", "shape", "size", "position", "relation", "background"])
def test_judge_rejects_wrong_captions(
    samples: list[tuple[Scene, np.ndarray]], key: str, degrade: Degrade | None
) -> None:
    rng = np.random.default_rng(1)
    verdicts = []
    for scene, image in samples[:400]:
        wrong = _mutations(scene, key, rng)
        if wrong is not None:
            shown = image if degrade is None else degrade(image, rng)
            verdicts.append(judge(shown, caption(wrong)))
    assert len(verdicts) >= 150
    assert np.mean([not v[key] for v in verdicts]) >= 0.95
    assert np.mean([not v["all"] for v in verdicts]) >= 0.95


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_image_fails_count_and_all(background: str) -> None:
    blank = np.empty((64, 64, 3), np.uint8)
    blank[:] = BACKGROUNDS[background]
    noisy = _noise(blank, np.random.default_rng(0))
    for image in (blank, noisy):
        assert detect_objects(image)[0] == []
        for text in ("a small red circle at the top left", "a red circle above a blue square"):
            verdict = judge(image, text)
            assert not verdict["count"] and not verdict["all"]


def test_judge_reads_tensors_in_minus_one_one(samples: list[tuple[Scene, np.ndarray]]) -> None:
    for scene, image in samples[:10]:
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        assert judge(tensor, caption(scene)) == judge(image, caption(scene))
    with pytest.raises(ValueError, match="uint8"):
        judge(image.astype(np.float32), caption(scene))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        judge(torch.zeros(64, 64, 3), caption(scene))


def test_judge_counts_objects_and_picks_the_best_assignment() -> None:
    a = ShapeObject("square", "yellow", "small", (1, 0))
    b = ShapeObject("triangle", "blue", "large", (1, 2))
    image = render(Scene((a, b), "black", "left of"))
    both = judge(image, "a blue triangle to the right of a yellow square")
    assert both["all"] and both["relation"]
    swapped = judge(image, "a yellow square to the right of a blue triangle")
    assert swapped["color"] and swapped["shape"] and not swapped["relation"]
    single = judge(image, "a large blue triangle on the right")
    assert single["color"] and single["shape"] and single["position"] and not single["count"]


def test_judge_batch_averages_each_key(samples: list[tuple[Scene, np.ndarray]]) -> None:
    one = next((s, im) for s, im in samples if s.relation is None)
    two = next((s, im) for s, im in samples if s.relation is not None)
    wrong = caption(replace(one[0], background=next(b for b in BACKGROUNDS
                                                    if b != one[0].background)))
    scores = judge_batch([one[1], two[1], one[1]], [caption(one[0]), caption(two[0]), wrong])
    assert scores["color"] == 1.0 and scores["relation"] == 1.0 and scores["position"] == 1.0
    assert scores["background"] == pytest.approx(2 / 3) and scores["all"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge_batch([one[1], two[1]], [caption(one[0])])


class _Identity(torch.nn.Module):
    """A stage-1 stand-in whose reconstructions are its inputs: the judge sees the real images."""

    quantizer = type("Quantizer", (), {"codebook_size": 4})()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.images = images
        return torch.zeros(len(images), 4, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.images


def test_reconstruction_judge_scores_do_not_depend_on_the_batch_size(
    samples: list[tuple[Scene, np.ndarray]],
) -> None:
    """Keys that apply to some images only (relation, size, position, background) are averaged
    over those images, not weighted by the batches they came in."""
    from parti.eval.tokenizer import reconstruction_sums, summarize

    pairs = samples[:24]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1
                          for _, im in pairs])
    captions = [caption(scene) for scene, _ in pairs]
    expected = judge_batch(images, captions)
    assert 0 < sum(s.relation is not None for s, _ in pairs) < len(pairs)
    for size in (1, 5, 24):
        batches = [{"image": images[i:i + size], "caption": captions[i:i + size]}
                   for i in range(0, len(pairs), size)]
        metrics = summarize(*reconstruction_sums(_Identity(), batches, None, torch.device("cpu")))
        judged = {k.removeprefix("judge_"): v for k, v in metrics.items() if k.startswith("judge_")}
        assert judged == pytest.approx(expected), size
