"""Judge whether an image shows what its shapes caption says (colour, shape, size, position, ...).

Built to score *generated* images, so every step tolerates what an image tokenizer does to pixels
(blur, colour shifts and halos, blocky artefacts, noise): the background is the border median,
objects are connected components of pixels far from it, an object's colour is the nearest palette
colour to the median of its core pixels, and its shape is the drawn template (placed, sized and
blurred from the object's own moments) with the best soft IoU against the object's contrast map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
from scipy import ndimage

from parti.data.shapes import (
    BACKGROUNDS,
    CELL_CENTERS,
    COLORS,
    EXTENTS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    parse_caption,
    shape_coverage,
)

MIN_OBJECT_AREA = 0.006  # components smaller than this fraction of the image are specks
MIN_FOREGROUND_DISTANCE = 40.0  # RGB levels: never call a pixel an object closer than this
MIN_SHAPE_IOU = 0.5  # a worse best fit is a blob, not any of the shapes
RELATION_MIN_OFFSET = 0.1  # centres must be at least this far apart along the stated axis
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (K_bg, 3)
_SIZE_THRESHOLD = float(np.sqrt(EXTENTS["small"] * EXTENTS["large"]))
# Contrast is measured mostly in luma: codecs and tokenizers keep luma edges far sharper than
# chroma (JPEG halves chroma resolution); chroma still carries it where luma hardly differs.
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
_CHROMA_WEIGHT = 0.03
_CONTRAST_METRIC = _RGB_TO_YCBCR.T @ np.diag([1.0, _CHROMA_WEIGHT, _CHROMA_WEIGHT]) @ _RGB_TO_YCBCR
_PAD = 4  # pixels around an object where a blurred template may spill
_CELL_EDGES = ((CELL_CENTERS[0] + CELL_CENTERS[1]) / 2, (CELL_CENTERS[1] + CELL_CENTERS[2]) / 2)


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; centre, extent and area are in fractions of the image side."""

    color: str
    shape: str | None  # None when no template fits (shape_iou < MIN_SHAPE_IOU)
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]  # (x, y)
    extent: float
    area: float
    shape_iou: float  # how well the best template fits, in [0, 1]


def to_hwc_pixels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pixels as (H, W, 3) in [0, 255] from uint8 HWC numpy or a float CHW tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"a tensor image must be float (3, H, W) in [-1, 1], got "
                             f"{image.dtype} {tuple(image.shape)}")
        chw = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5  # (3, H, W) in [0, 255]
        return chw.permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a numpy image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _border_median(image: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel frame: the background, as objects never fill the border."""
    frame = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (P, 3)
    return np.median(frame, axis=0)


def _nearest(palette: np.ndarray, color: np.ndarray) -> int:
    return int(np.argmin(np.linalg.norm(palette - color, axis=1)))


def _shape_moments(shape: str, extent: float = 200.0) -> tuple[float, float, float]:
    """(fill, centroid dy, variance) of a drawn shape per unit extent: area / S^2, (centroid y -
    box centre y) / S and (var_x + var_y) / S^2, measured on a large render so they are exact."""
    grid = np.arange(int(extent) + 8, dtype=np.float64) + 0.5
    center = grid[-1] / 2 + 0.25
    cover = shape_coverage(shape, center, center, extent, grid[None, :], grid[:, None])
    mass = cover.sum()
    mx, my = (cover * grid[None, :]).sum() / mass, (cover * grid[:, None]).sum() / mass
    var = (cover * ((grid[None, :] - mx) ** 2 + (grid[:, None] - my) ** 2)).sum() / mass
    return mass / extent**2, (my - center) / extent, var / extent**2


_MOMENTS = {shape: _shape_moments(shape) for shape in SHAPES}


def _fit_shape(soft: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best template for a soft object map (1 = object colour, 0 = background) whose top-left
    pixel is (x0, y0): (shape, soft IoU, cx, cy, extent), lengths in pixels.

    Blur, block averaging and noise keep an object's mass, centroid and (up to the blur's own
    variance) spread, so each shape hypothesis gets its extent, centre and blur from those
    moments, is drawn, blurred and compared with the map; the best-matching shape wins.
    """
    ys = np.arange(y0, y0 + soft.shape[0], dtype=np.float32)[:, None] + 0.5  # pixel centres
    xs = np.arange(x0, x0 + soft.shape[1], dtype=np.float32)[None, :] + 0.5
    mass = float(soft.sum())
    mx, my = float((soft * xs).sum()) / mass, float((soft * ys).sum()) / mass
    var = float((soft * ((xs - mx) ** 2 + (ys - my) ** 2)).sum()) / mass
    best = ("", -1.0, 0.0, 0.0, 0.0)
    for shape, (fill, centroid_dy, spread) in _MOMENTS.items():
        extent = float(np.sqrt(mass / fill))
        cy = my - centroid_dy * extent
        sigma = float(np.sqrt(max(var - spread * extent**2, 0.0) / 2))
        template = shape_coverage(shape, mx, cy, extent, xs, ys)
        if sigma > 0.25:
            template = ndimage.gaussian_filter(template, sigma, mode="constant")
        iou = float(np.minimum(template, soft).sum() / np.maximum(template, soft).sum())
        if iou > best[1]:
            best = (shape, iou, mx, cy, extent)
    return best


def _cell(center: tuple[float, float]) -> tuple[int, int]:
    x, y = center
    return int(np.searchsorted(_CELL_EDGES, y)), int(np.searchsorted(_CELL_EDGES, x))


def _soft_map(offset: np.ndarray, direction: np.ndarray, region: np.ndarray) -> np.ndarray:
    """How far each pixel moved from the background (0) towards the object colour (1), within
    `region`: a weighted projection of its offset onto the object's offset `direction`."""
    weighted = _CONTRAST_METRIC @ direction
    contrast = offset @ weighted / max(float(direction @ weighted), 1e-6)  # (h, w)
    return np.clip(contrast, 0.0, 1.0) * region


def detect_objects(image: np.ndarray | torch.Tensor) -> tuple[list[DetectedObject], str]:
    """All objects in an image (largest first) and the name of the nearest background colour."""
    pixels = to_hwc_pixels(image).astype(np.float32)  # (H, W, 3)
    height, width = pixels.shape[:2]
    background = _border_median(pixels)
    offset = pixels - background  # (H, W, 3)
    distance = np.linalg.norm(offset, axis=2)  # (H, W)
    nearest_object = np.linalg.norm(_PALETTE - background, axis=1).min()
    foreground = distance > max(MIN_FOREGROUND_DISTANCE, 0.4 * nearest_object)
    foreground = ndimage.binary_opening(foreground)  # drops specks of noise
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    found = []
    for label in np.flatnonzero(areas[1:] >= MIN_OBJECT_AREA * height * width) + 1:
        component = labels == label
        # Core pixels (the far quarter of the component) give a colour free of edge halos.
        core = component & (distance >= np.quantile(distance[component], 0.75))
        color = np.median(pixels[core], axis=0)
        # The map covers the component's blurred fringe but no other object.
        region = ndimage.binary_dilation(component, iterations=2) & ((labels == 0) | component)
        rows, cols = np.nonzero(region)
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        soft = _soft_map(offset[y0:y1, x0:x1], color - background, region[y0:y1, x0:x1])
        if soft.sum() < 1.0:  # nothing moves towards its own colour: not an object
            continue
        shape, iou, cx, cy, extent = _fit_shape(np.pad(soft, _PAD), x0 - _PAD, y0 - _PAD)
        center = (cx / width, cy / height)
        found.append(DetectedObject(
            color=list(COLORS)[_nearest(_PALETTE, color)],
            shape=shape if iou >= MIN_SHAPE_IOU else None,
            size="large" if extent / max(height, width) > _SIZE_THRESHOLD else "small",
            cell=_cell(center),
            center=center,
            extent=extent / max(height, width),
            area=float(areas[label]) / (height * width),
            shape_iou=iou,
        ))
    found.sort(key=lambda obj: obj.area, reverse=True)
    return found, list(BACKGROUNDS)[_nearest(_BACKGROUND_PALETTE, background)]


def _relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """a is `relation` b when the offset along the stated axis is clear and dominates the other."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx),
                     "below": (-dy, dx)}[relation]
    return along > max(abs(across), RELATION_MIN_OFFSET)


def _object_checks(spec: ObjectSpec, obj: DetectedObject) -> dict[str, bool]:
    checks = {"color": obj.color == spec.color, "shape": obj.shape == spec.shape}
    if spec.size is not None:
        checks["size"] = obj.size == spec.size
    if spec.cell is not None:
        checks["position"] = obj.cell == spec.cell
    return checks


def _match(spec: SceneSpec, found: list[DetectedObject]) -> dict[str, bool]:
    """Per-attribute verdicts for the assignment of detections to caption objects that agrees
    most on appearance (then on the relation): object identity comes from what it looks like."""
    keys = ["color", "shape"]
    if spec.relation is not None:
        keys.append("relation")
    else:
        keys += [k for k, v in (("size", spec.objects[0].size),
                                ("position", spec.objects[0].cell)) if v is not None]
    best, best_score = dict.fromkeys(keys, False), (-1, -1)
    for chosen in permutations(found, len(spec.objects)):
        per_object = [_object_checks(s, o) for s, o in zip(spec.objects, chosen)]
        verdict = {k: all(checks[k] for checks in per_object) for k in keys if k != "relation"}
        if spec.relation is not None:
            verdict["relation"] = _relation_holds(spec.relation, *chosen)
        score = (sum(sum(checks.values()) for checks in per_object), sum(verdict.values()))
        if score > best_score:
            best, best_score = verdict, score
    return best


def judge(image: np.ndarray | torch.Tensor, caption: str) -> dict[str, bool]:
    """Which facts of `caption` the image visibly satisfies.

    Keys: "color", "shape", then "size" and "position" (one object, when stated) or "relation"
    (two objects; colour/shape true only when both objects are right), "background" when the
    caption names one, "count" (right number of objects) and "all".
    """
    spec = parse_caption(caption)
    found, background = detect_objects(image)
    verdict = _match(spec, found)
    if spec.background is not None:
        verdict["background"] = background == spec.background
    verdict["count"] = len(found) == len(spec.objects)
    verdict["all"] = all(verdict.values())
    return verdict


def judge_counts(
    images: Sequence[np.ndarray] | np.ndarray | torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """Per judge key, how many images satisfy it (`key`) and how many it applies to (`key_n`):
    sums, so batches and ranks add theirs before dividing (a key such as "relation" applies to
    some images only, so a mean of batch means would weigh it wrongly)."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("judging needs at least one image")
    counts: dict[str, float] = {}
    for image, text in zip(images, captions):
        for key, ok in judge(image, text).items():
            counts[key] = counts.get(key, 0.0) + float(ok)
            counts[f"{key}_n"] = counts.get(f"{key}_n", 0.0) + 1.0
    return counts


def judge_batch(
    images: Sequence[np.ndarray] | np.ndarray | torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """Mean of each judge key over a batch; a key is averaged over the images it applies to."""
    counts = judge_counts(images, captions)
    return {key: counts[key] / counts[f"{key}_n"] for key in counts if not key.endswith("_n")}
