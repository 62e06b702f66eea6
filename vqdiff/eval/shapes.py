"""Exact attribute scoring of Shapes images against their captions.

1. Colour: each pixel goes to the palette colour whose blend line with white passes closest to it,
   if it is at least half that colour (so anti-aliased rims split at half coverage); far-off pixels
   belong to no colour.
2. Objects: the 8-connected same-colour regions that keep MIN_CORE_PIXELS after erosion by a plus,
   so the thin blends where two colours touch (red + yellow looks orange) are not objects.
3. Attributes: the region's soft coverage (from luma, which JPEG keeps sharp) is compared with each
   shape's template of the same area and centroid, sharp and slightly blurred; the best one gives
   the shape, its extent the size (small 12 vs large 20 px at 64) and its centre the cell.
4. Matching: each caption object takes a region of its colour (else an unclaimed region in its cell,
   so shape and size are still judged); it is correct when every attribute matches, and an image is
   correct when all its objects are and no region is left over.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vqdiff.data.shapes import (BACKGROUND, BASE_SIZE, COLOURS, POSITIONS, SHAPE_AREAS, SHAPES, SIZES, Object,
                                coverage, parse_caption)

ATTRIBUTES = ("colour", "shape", "position", "size")

_COLOUR_NAMES = tuple(COLOURS)
_WHITE = np.asarray(BACKGROUND, dtype=np.float64)
_DIRECTIONS = np.asarray(list(COLOURS.values()), dtype=np.float64) - _WHITE  # [K, 3], white -> colour
_DIRECTION_NORMS = (_DIRECTIONS ** 2).sum(axis=1)  # [K]
# Coverage is read from luma, which JPEG keeps at full resolution (chroma is subsampled 2x2).
_LUMA = np.asarray([0.299, 0.587, 0.114])
_LUMA_DROPS = _DIRECTIONS @ _LUMA  # [K], luma change from white to each colour (negative)

MIN_STRENGTH = 0.5  # a pixel is a colour's when at least half of it is that colour (blend with white)
MAX_RESIDUAL = 60.0  # RGB distance from the white-colour blend line beyond which a pixel is "other"
MIN_CORE_PIXELS = 8.0  # pixels (at 64 px) a region keeps after erosion by a plus to count as an object
TEMPLATE_BLURS = (0.6, 1.2)  # px; shapes are also compared with blurred templates
LARGE_MIN_EXTENT = (SIZES["small"] + SIZES["large"]) / 2  # px at 64


@dataclass(frozen=True)
class Detection:
    """A region of one palette colour and the attributes judged from it.

    box = (left, top, right, bottom) in pixels, ends exclusive.
    """
    colour: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    area: int

    def matches(self, obj: Object) -> dict[str, bool]:
        return {name: getattr(self, name) == getattr(obj, name) for name in ATTRIBUTES}


def image_array(image: Any) -> np.ndarray:
    """PIL image, uint8 array [H, W, 3] or tensor [3, H, W] (float in [-1, 1], or uint8) -> float64 [H, W, 3].

    The result is in 0..255; images must be square.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        array = image.astype(np.float64)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be [3, H, W], got {list(image.shape)}")
        pixels = image.detach().cpu()
        if pixels.dtype == torch.uint8:
            pixels = pixels.double()
        elif pixels.is_floating_point():
            pixels = (pixels.double().clamp(-1, 1) + 1) * 127.5
        else:
            raise ValueError(f"tensor images must be float in [-1, 1] or uint8, got {pixels.dtype}")
        array = pixels.permute(1, 2, 0).numpy()
    else:
        raise TypeError(f"cannot score an image of type {type(image).__name__}; give PIL, uint8 numpy or a tensor")
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"Shapes images are square, got {array.shape[1]}x{array.shape[0]}")
    return array


def colour_labels(pixels: np.ndarray) -> np.ndarray:
    """Per pixel the index of its palette colour in COLOURS, or -1 for background and other colours; [H, W]."""
    height, width, _ = pixels.shape
    offset = (pixels - _WHITE).reshape(-1, 3)  # [P, 3]
    norm = (offset ** 2).sum(axis=1)
    labels = np.full(height * width, -1)
    # t_k <= |offset| / |direction_k|, so fainter pixels cannot reach MIN_STRENGTH for any colour.
    candidates = np.flatnonzero(norm >= (MIN_STRENGTH ** 2) * _DIRECTION_NORMS.min())
    dot = offset[candidates] @ _DIRECTIONS.T  # [n, K]
    t = np.clip(dot / _DIRECTION_NORMS, 0.0, 1.0)  # blend fraction along white -> colour
    residual = norm[candidates, None] - 2 * t * dot + t ** 2 * _DIRECTION_NORMS  # squared distance to the blend line
    best = residual.argmin(axis=1)
    rows = np.arange(len(candidates))
    keep = (t[rows, best] >= MIN_STRENGTH) & (residual[rows, best] < MAX_RESIDUAL ** 2)
    labels[candidates[keep]] = best[keep]
    return labels.reshape(height, width)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _run_components(rows: list[int], starts: list[int], ends: list[int], colours: list[int]) -> list[int]:
    """Union-find over same-colour horizontal runs [start, end) in row-major order: component root per run."""
    parent = list(range(len(rows)))
    above_first, above_end = 0, 0  # runs of the previous row
    i = 0
    while i < len(rows):
        row, first = rows[i], i
        while i < len(rows) and rows[i] == row:
            i += 1
        if above_end > above_first and rows[above_first] == row - 1:
            a, b = above_first, first
            while a < above_end and b < i:
                # 8-connected: the runs overlap or touch diagonally
                if colours[a] == colours[b] and starts[a] <= ends[b] and starts[b] <= ends[a]:
                    parent[_find(parent, a)] = _find(parent, b)
                if ends[a] < ends[b]:
                    a += 1
                else:
                    b += 1
        above_first, above_end = first, i
    return [_find(parent, k) for k in range(len(rows))]


@dataclass
class _Region:
    colour: int
    area: int
    core: int  # pixels left after erosion by a plus
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    index: int  # its number in the component map


def _regions(labels: np.ndarray) -> tuple[list[_Region], np.ndarray]:
    """8-connected same-colour regions of labels [H, W] and the map of region numbers (-1 elsewhere)."""
    height, width = labels.shape
    padded = np.full((height + 2, width + 2), -1)
    padded[1:-1, 1:-1] = labels
    on = labels >= 0
    rows, starts = np.nonzero(on & (labels != padded[1:-1, :-2]))
    _, lasts = np.nonzero(on & (labels != padded[1:-1, 2:]))  # same row-major order, so runs pair up
    ends = lasts + 1
    colours = labels[rows, starts]
    roots = _run_components(rows.tolist(), starts.tolist(), ends.tolist(), colours.tolist())
    numbers: dict[int, int] = {}
    component = np.array([numbers.setdefault(root, len(numbers)) for root in roots], dtype=np.int64)
    count = len(numbers)
    lengths = ends - starts
    region_map = np.full(height * width, -1)
    region_map[np.flatnonzero(on)] = np.repeat(component, lengths)
    region_map = region_map.reshape(height, width)
    core = on.copy()
    for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):  # erosion by a plus: keeps small convex shapes, drops 2-px lines
        core &= padded[dy:dy + height, dx:dx + width] == labels
    core_count = np.bincount(region_map[core], minlength=count)
    area = np.bincount(component, lengths, minlength=count)
    centroid_x = np.bincount(component, (starts + ends) / 2 * lengths, minlength=count) / area
    centroid_y = np.bincount(component, (rows + 0.5) * lengths, minlength=count) / area
    top, left = np.full(count, height), np.full(count, width)
    bottom, right = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    np.minimum.at(top, component, rows)
    np.maximum.at(bottom, component, rows + 1)
    np.minimum.at(left, component, starts)
    np.maximum.at(right, component, ends)
    region_colour = np.empty(count, dtype=np.int64)
    region_colour[component] = colours  # all runs of a region share its colour
    regions = [_Region(int(region_colour[c]), int(area[c]), int(core_count[c]),
                       (int(left[c]), int(top[c]), int(right[c]), int(bottom[c])),
                       (float(centroid_x[c]), float(centroid_y[c])), c) for c in range(count)]
    return regions, region_map


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2 radius + 1)^2 square, done as a row pass and a column pass."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    rows = np.zeros((height + 2 * radius, width), dtype=bool)
    for dx in range(2 * radius + 1):
        rows |= padded[:, dx:dx + width]
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        out |= rows[dy:dy + height]
    return out


def _soft_mask(region: _Region, pixels: np.ndarray, labels: np.ndarray, region_map: np.ndarray,
               window: tuple[int, int, int, int]) -> np.ndarray:
    """The region's colour fraction per pixel of the window, including the faint anti-aliased rim; [Y, X]."""
    x0, y0, x1, y1 = window
    own = region_map[y0:y1, x0:x1] == region.index
    rim = _dilate(own, 2) & ((labels[y0:y1, x0:x1] == -1) | own)
    t = (pixels[y0:y1, x0:x1] - _WHITE) @ _LUMA / _LUMA_DROPS[region.colour]
    return np.where(rim, np.clip(t, 0.0, 1.0), 0.0)


def _blur_matrices(length: int) -> np.ndarray:
    """[1 + len(TEMPLATE_BLURS), length, length]: identity, then a Gaussian blur along one axis per sigma."""
    offsets = np.arange(length)[:, None] - np.arange(length)[None, :]
    sigmas = np.asarray(TEMPLATE_BLURS)[:, None, None]
    blurs = np.exp(-0.5 * (offsets / sigmas) ** 2) / (sigmas * math.sqrt(2 * math.pi))
    return np.concatenate([np.eye(length)[None], blurs])


def _fit_shape(soft: np.ndarray, window: tuple[int, int, int, int]) -> tuple[str, float, tuple[float, float]]:
    """The shape whose template (same area and centroid, sharp or blurred) differs least from the soft mask.

    Returns (shape, extent, centre). Blurred templates keep small or blurry renderings from looking
    like circles.
    """
    x0, y0, x1, y1 = window
    area = soft.sum()
    cx = float(soft.sum(axis=0) @ (np.arange(x0, x1) + 0.5) / area)
    cy = float(soft.sum(axis=1) @ (np.arange(y0, y1) + 0.5) / area)
    extents = [math.sqrt(area / SHAPE_AREAS[shape]) for shape in SHAPES]
    # A triangle's centroid lies s/6 below the centre of its box.
    centres = [(cx, cy - extent / 6) if shape == "triangle" else (cx, cy) for shape, extent in zip(SHAPES, extents)]
    templates = np.stack([coverage(shape, centre, extent, window) for shape, centre, extent
                          in zip(SHAPES, centres, extents)])  # [S, Y, X]
    blurred = _blur_matrices(y1 - y0)[:, None] @ templates @ _blur_matrices(x1 - x0)[:, None].transpose(0, 1, 3, 2)
    errors = np.abs(blurred - soft).sum(axis=(2, 3)).min(axis=0)  # [S], best blur per shape
    best = int(errors.argmin())
    return SHAPES[best], extents[best], centres[best]


def _judge(region: _Region, pixels: np.ndarray, labels: np.ndarray, region_map: np.ndarray) -> Detection:
    size = region_map.shape[0]
    left, top, right, bottom = region.box
    window = (max(0, left - 2), max(0, top - 2), min(size, right + 2), min(size, bottom + 2))
    shape, extent, (cx, cy) = _fit_shape(_soft_mask(region, pixels, labels, region_map, window), window)
    large = extent * BASE_SIZE / size >= LARGE_MIN_EXTENT
    col = min(2, max(0, int(cx / (size / 3))))
    row = min(2, max(0, int(cy / (size / 3))))
    return Detection(_COLOUR_NAMES[region.colour], shape, "large" if large else "small", POSITIONS[3 * row + col],
                     region.box, region.area)


def detect_objects(image: Any) -> list[Detection]:
    """All objects in an image (any format `image_array` takes), largest first."""
    pixels = image_array(image)
    min_core = max(1.0, MIN_CORE_PIXELS * (pixels.shape[0] / BASE_SIZE) ** 2)
    labels = colour_labels(pixels)
    regions, region_map = _regions(labels)
    detections = [_judge(region, pixels, labels, region_map) for region in regions if region.core >= min_core]
    return sorted(detections, key=lambda d: -d.area)


def _best(candidates: list[Detection], obj: Object) -> Detection | None:
    # Most matching attributes first, then the larger region.
    return max(candidates, key=lambda d: (sum(d.matches(obj).values()), d.area), default=None)


def score_image(image: Any, objects: Sequence[Object] | str) -> dict:
    """Score one image against its caption's objects (or the caption text).

    Returns {"objects": [one dict per caption object: "object": Object, "colour", "shape", "position",
    "size", "correct": bool, "detection": Detection | None], "extra": [Detection], "correct": bool}.
    """
    if isinstance(objects, str):
        objects = parse_caption(objects)
    free = detect_objects(image)
    assigned: list[Detection | None] = []
    for obj in objects:  # a region of the named colour
        detection = _best([d for d in free if d.colour == obj.colour], obj)
        if detection is not None:
            free.remove(detection)
        assigned.append(detection)
    for i, obj in enumerate(objects):  # else a wrongly coloured region in the named cell
        if assigned[i] is None:
            assigned[i] = _best([d for d in free if d.position == obj.position], obj)
            if assigned[i] is not None:
                free.remove(assigned[i])
    results = []
    for obj, detection in zip(objects, assigned):
        matches = detection.matches(obj) if detection else dict.fromkeys(ATTRIBUTES, False)
        results.append({"object": obj, **matches, "correct": all(matches.values()), "detection": detection})
    correct = all(r["correct"] for r in results) and not free
    return {"objects": results, "extra": free, "correct": correct}


_COLUMNS = ATTRIBUTES + ("object", "image", "extra")


@dataclass
class ShapesReport:
    """Accuracies per group of images; `scores` holds score_image's result per image, in order."""
    groups: dict[str, dict[str, float | int | None]]
    scores: list[dict] = field(repr=False)

    def to_dict(self) -> dict:
        return {"groups": self.groups}

    def table(self) -> str:
        """The report as a plain-text table of percentages."""
        header = f"{'group':<20}{'images':>7}{'objects':>8}" + "".join(f"{name:>9}" for name in _COLUMNS)
        lines = [header, "-" * len(header)]
        for name, stats in self.groups.items():
            images = "-" if stats["images"] is None else str(stats["images"])
            cells = "".join(f"{'-' if stats[c] is None else f'{100 * stats[c]:.1f}':>9}" for c in _COLUMNS)
            lines.append(f"{name:<20}{images:>7}{stats['objects']:>8}{cells}")
        return "\n".join(lines)


def _group_stats(object_results: list[dict], image_scores: list[dict] | None) -> dict:
    stats: dict[str, float | int | None] = {
        "images": None if image_scores is None else len(image_scores), "objects": len(object_results)}
    for name in ATTRIBUTES + ("correct",):
        value = float(np.mean([r[name] for r in object_results])) if object_results else None
        stats["object" if name == "correct" else name] = value
    stats["image"] = None if not image_scores else float(np.mean([s["correct"] for s in image_scores]))
    stats["extra"] = None if not image_scores else float(np.mean([bool(s["extra"]) for s in image_scores]))
    return stats


def evaluate(images: Sequence[Any], captions: Sequence[str | Sequence[Object]]) -> ShapesReport:
    """Score images against captions; groups: all, by object count, seen vs held-out (colour, shape) pairs,
    and each object count split into seen and held-out (when there are several counts).

    "held-out" holds the images with at least one held-out pair; "held-out objects" scores just those objects.
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images for {len(captions)} captions")
    parsed = [parse_caption(c) if isinstance(c, str) else list(c) for c in captions]
    scores = [score_image(image, objects) for image, objects in zip(images, parsed)]
    members: dict[str, list[int]] = {"all": list(range(len(scores)))}
    for count in sorted({len(objects) for objects in parsed}):
        members[f"{count} object{'s' if count > 1 else ''}"] = [i for i, o in enumerate(parsed) if len(o) == count]
    members["seen"] = [i for i, o in enumerate(parsed) if not any(obj.heldout for obj in o)]
    members["held-out"] = [i for i, o in enumerate(parsed) if any(obj.heldout for obj in o)]
    counts = [name for name in members if name.endswith(("object", "objects"))]
    if len(counts) > 1:  # the crossings: a target on one-object prompts may mean seen pairs or all of them
        for count in counts:
            for split in ("seen", "held-out"):
                members[f"{count} {split}"] = sorted(set(members[count]) & set(members[split]))
    groups = {}
    for name, indices in members.items():
        if indices:
            results = [r for i in indices for r in scores[i]["objects"]]
            groups[name] = _group_stats(results, [scores[i] for i in indices])
    heldout_results = [r for objects, s in zip(parsed, scores) for obj, r in zip(objects, s["objects"]) if obj.heldout]
    if heldout_results:
        groups["held-out objects"] = _group_stats(heldout_results, None)
    return ShapesReport(groups, scores)
