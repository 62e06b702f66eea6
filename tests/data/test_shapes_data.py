import json
import math
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.data.shapes import (ALL_PAIRS, COLOURS, HELDOUT_PAIRS, POSITIONS, SHAPE_AREAS, SHAPES, SIZES, Object,
                                ShapesDataset, caption, cell_centre, collate, eval_prompts, item_seed, paraphrase,
                                parse_caption, random_scene, render, render_array)

REPO = Path(__file__).resolve().parents[2]


def scenes(split, n, seed=0, max_objects=2):
    dataset = ShapesDataset(split, num_samples=n, seed=seed, max_objects=max_objects)
    return [dataset.scene(i) for i in range(n)]


# --- determinism --------------------------------------------------------------------------------

def test_items_are_deterministic_and_independent_of_access_order():
    a = ShapesDataset("train", num_samples=50, seed=3)
    b = ShapesDataset("train", num_samples=50, seed=3)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["objects"] == y["objects"]
    assert torch.equal(a[7]["image"], a[7]["image"])


def test_seed_and_split_change_the_stream():
    base = [ShapesDataset("train", num_samples=20, seed=0).caption(i) for i in range(20)]
    other_seed = [ShapesDataset("train", num_samples=20, seed=1).caption(i) for i in range(20)]
    val = [ShapesDataset("val", num_samples=20, seed=0).caption(i) for i in range(20)]
    assert sum(x == y for x, y in zip(base, other_seed)) <= 2
    assert sum(x == y for x, y in zip(base, val)) <= 2
    seeds = {item_seed(s, split, i) for s in range(3) for split in ("train", "val", "heldout") for i in range(100)}
    assert len(seeds) == 900 and all(0 <= s < 2 ** 63 for s in seeds)


def test_random_scene_uses_the_generator_only():
    first = random_scene("heldout", 2, torch.Generator().manual_seed(5))
    second = random_scene("heldout", 2, torch.Generator().manual_seed(5))
    assert first == second


# --- split rules and distribution ----------------------------------------------------------------

def test_heldout_pairs_are_a_documented_fixed_subset():
    assert len(HELDOUT_PAIRS) >= 4 and HELDOUT_PAIRS <= set(ALL_PAIRS) and len(ALL_PAIRS) == 24


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_and_val_never_contain_heldout_pairs(split):
    pairs = Counter((obj.colour, obj.shape) for objects, _ in scenes(split, 2000) for obj in objects)
    assert not set(pairs) & HELDOUT_PAIRS
    assert set(pairs) == set(ALL_PAIRS) - HELDOUT_PAIRS  # every seen pair does occur


def test_every_heldout_image_has_a_heldout_pair_in_any_slot():
    slots = Counter()
    for objects, _ in scenes("heldout", 1000):
        assert any(obj.heldout for obj in objects)
        slots.update(i for i, obj in enumerate(objects) if obj.heldout)
    assert slots[0] > 100 and slots[1] > 100  # not always the first object of the caption


def test_objects_use_distinct_cells_and_colours_and_cover_every_value():
    counts = Counter()
    for objects, offsets in scenes("train", 3000, max_objects=3):
        assert len({o.position for o in objects}) == len(objects)
        assert len({o.colour for o in objects}) == len(objects)
        counts[len(objects)] += 1
        counts.update(value for o in objects for value in (o.shape, o.colour, o.size, o.position))
    for key in (1, 2, 3, *SHAPES, *COLOURS, *SIZES, *POSITIONS):
        assert counts[key] > 50, key
    # object counts are uniform over 1..max_objects: 1000 each, binomial sd ~26
    assert all(abs(counts[k] - 1000) < 130 for k in (1, 2, 3))


def test_jitter_is_uniform_within_two_pixels():
    offsets = np.array([off for _, offs in scenes("val", 3000) for off in offs])  # [N, 2]
    assert np.abs(offsets).max() <= 2.0
    # uniform on [-2, 2]: mean 0, sd 2/sqrt(3) = 1.155; N ~ 4500 so 5-sigma bounds are ~0.09 and ~0.05
    assert np.abs(offsets.mean(axis=0)).max() < 0.1
    assert np.abs(offsets.std(axis=0) - 2 / math.sqrt(3)).max() < 0.05


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset("train", max_objects=7)
    with pytest.raises(ValueError, match="colour"):
        Object("circle", "pink", "small", "top")
    with pytest.raises(IndexError):
        ShapesDataset("train", num_samples=3)[3]


# --- captions ------------------------------------------------------------------------------------

def test_caption_format_matches_the_spec():
    one = [Object("circle", "red", "large", "top left")]
    two = [Object("square", "blue", "small", "left"), Object("triangle", "yellow", "large", "bottom right")]
    assert caption(one) == "a large red circle at the top left"
    assert caption(two) == "a small blue square at the left and a large yellow triangle at the bottom right"


@pytest.mark.parametrize("use_paraphrase", [False, True])
def test_parse_caption_round_trips(use_paraphrase):
    generator = torch.Generator().manual_seed(0)
    texts = set()
    for split in ("train", "heldout"):
        for objects, _ in scenes(split, 500, max_objects=3):
            text = paraphrase(objects, generator) if use_paraphrase else caption(objects)
            assert parse_caption(text) == objects
            texts.add(text.split(" ")[0])
    if use_paraphrase:
        assert len(texts) >= 3  # several templates are in use


def test_parse_caption_is_lenient_on_case_and_spacing():
    assert parse_caption("  A Large RED circle at the  top left. ") == [Object("circle", "red", "large", "top left")]


@pytest.mark.parametrize("text", ["", "a large pink circle at the top left", "a big red circle at the top",
                                  "a large red circle at the top left and", "draw something nice",
                                  "a large red circle at the middle"])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption(text)


def test_dataset_paraphrase_option_keeps_the_objects():
    plain = ShapesDataset("train", num_samples=200, seed=0)
    varied = ShapesDataset("train", num_samples=200, seed=0, paraphrase=True)
    differ = 0
    for i in range(200):
        assert parse_caption(varied.caption(i)) == plain.scene(i)[0]
        differ += varied.caption(i) != plain.caption(i)
    assert differ > 100


# --- rendering -----------------------------------------------------------------------------------

def clip_polygon(polygon, x0, y0, x1, y1):
    """Sutherland-Hodgman clip of a convex polygon to a box (float64)."""
    for axis, bound, keep_below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        inside = (lambda p: p[axis] <= bound) if keep_below else (lambda p: p[axis] >= bound)
        out = []
        for i, p in enumerate(polygon):
            q = polygon[i - 1]
            if inside(p) != inside(q):
                t = (bound - q[axis]) / (p[axis] - q[axis])
                out.append((q[0] + t * (p[0] - q[0]), q[1] + t * (p[1] - q[1])))
            if inside(p):
                out.append(p)
        polygon = out
        if not polygon:
            return []
    return polygon


def polygon_area(polygon):
    return 0.5 * abs(sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(polygon, polygon[1:] + polygon[:1])))


def exact_coverage(shape, cx, cy, s, size):
    """Per-pixel coverage [size, size]: exact polygon clipping, or 64x64 samples per pixel for the circle."""
    h = s / 2
    vertices = {"square": [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)],
                "triangle": [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)],
                "diamond": [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]}
    out = np.zeros((size, size))
    for y in range(max(0, int(cy - h) - 1), min(size, int(cy + h) + 2)):
        for x in range(max(0, int(cx - h) - 1), min(size, int(cx + h) + 2)):
            if shape == "circle":
                sub = (np.arange(64) + 0.5) / 64
                out[y, x] = ((x + sub[None, :] - cx) ** 2 + (y + sub[:, None] - cy) ** 2 <= h * h).mean()
            else:
                out[y, x] = polygon_area(clip_polygon(vertices[shape], x, y, x + 1, y + 1))
    return out


@pytest.mark.parametrize("size,supersample", [(32, 4), (64, 4), (128, 4), (64, 16)])
@pytest.mark.parametrize("shape", SHAPES)
def test_render_matches_exact_geometry(shape, size, supersample):
    obj = Object(shape, "blue", "large" if size == 32 else "small", "center")
    offset = (1.3, -0.7)
    scale = size / 64
    image = render_array([obj], size, [offset], supersample).astype(np.float64)
    alpha = (255 - image[..., 0]) / (255 - COLOURS["blue"][0])  # red channel: 255 -> 40
    cx, cy = (np.array(cell_centre("center")) + offset) * scale
    s = SIZES[obj.size] * scale
    exact = exact_coverage(shape, cx, cy, s, size)
    assert np.abs(exact.sum() - SHAPE_AREAS[shape] * s * s) < 0.01 * s * s  # the reference itself
    # supersample^2 point samples per pixel: an edge moves by at most half a sample spacing
    step = 1 / supersample
    assert np.abs(alpha - exact).max() < step + 0.01
    assert abs(alpha.sum() - exact.sum()) < 0.12 * step * exact.sum()
    grid = np.arange(size) + 0.5
    centroid = (alpha.sum(0) @ grid / alpha.sum(), alpha.sum(1) @ grid / alpha.sum())
    reference = (exact.sum(0) @ grid / exact.sum(), exact.sum(1) @ grid / exact.sum())
    assert np.allclose(centroid, reference, atol=0.5 * step + 0.01)
    # pixels fully inside carry the exact palette colour; pixels far away are white
    assert (image[exact > 0.999] == COLOURS["blue"]).all()
    assert (image[exact == 0] == 255).all()


def test_later_objects_are_drawn_on_top_and_tensor_range():
    objects = [Object("square", "red", "large", "center"), Object("circle", "green", "small", "center")]
    image = np.asarray(render(objects))
    assert tuple(image[32, 32]) == COLOURS["green"] and tuple(image[32, 24]) == COLOURS["red"]
    item = ShapesDataset("val", size=32, num_samples=4)[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() == 1.0


def test_collate_batches_items_with_a_dataloader():
    dataset = ShapesDataset("train", num_samples=10, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["caption"] == [dataset[i]["caption"] for i in range(4)]
    assert batch["objects"][2] == dataset[2]["objects"]
    as_json = json.dumps([[obj.to_dict() for obj in objects] for objects in batch["objects"]])
    assert [[Object(**d) for d in objects] for objects in json.loads(as_json)] == batch["objects"]


def test_eval_prompts_are_fixed_canonical_and_match_the_dataset():
    prompts = eval_prompts("heldout", 30, seed=2)
    assert prompts == eval_prompts("heldout", 30, seed=2)
    dataset = ShapesDataset("heldout", num_samples=30, seed=2)
    for i, (text, objects) in enumerate(prompts):
        assert objects == dataset.scene(i)[0] and text == caption(objects) == dataset.caption(i)


# --- the folder writer ---------------------------------------------------------------------------

def test_make_shapes_writes_pngs_and_metadata(tmp_path, monkeypatch):
    out, grid = tmp_path / "shapes", tmp_path / "grid.png"
    monkeypatch.setattr(sys, "argv", ["make_shapes.py", "--out", str(out), "--n", "6", "--split", "val",
                                      "--seed", "4", "--grid", str(grid), "--grid-n", "4"])
    runpy.run_path(str(REPO / "scripts" / "make_shapes.py"), run_name="__main__")
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    dataset = ShapesDataset("val", num_samples=6, seed=4)
    assert [line["text"] for line in lines] == [dataset.caption(i) for i in range(6)]
    for i, line in enumerate(lines):
        pixels = torch.from_numpy(np.array(Image.open(out / line["file_name"]))).permute(2, 0, 1)
        assert torch.equal(pixels.float() / 127.5 - 1, dataset[i]["image"])
    assert Image.open(grid).size[0] > 64 * 4


# --- tokenizer augmentation ----------------------------------------------------------------------

def test_augmentation_keeps_the_scene_and_caption_and_is_deterministic():
    plain = ShapesDataset("train", size=32, num_samples=50)
    augmented = ShapesDataset("train", size=32, num_samples=50, extent_range=[0.6, 1.6], shift=3.0, flip=True)
    for i in range(50):
        assert augmented.caption(i) == plain.caption(i) and augmented[i]["objects"] == plain[i]["objects"]
        assert torch.equal(augmented[i]["image"], augmented[i]["image"])
    assert any(not torch.equal(augmented[i]["image"], plain[i]["image"]) for i in range(50))


def test_extent_range_scales_each_object_within_its_bounds():
    """One object per image, no shift or flip: the painted area (coverage summed over pixels, at 64 px) is
    the shape's area at extent s * u with u in [lo, hi], and u spreads over the range."""
    lo, hi = 0.5, 1.5
    data = ShapesDataset("val", size=64, num_samples=200, max_objects=1, extent_range=[lo, hi], supersample=8)
    ratios = []
    for i in range(200):
        obj = data[i]["objects"][0]
        image = (data[i]["image"] + 1) / 2  # [3, H, W] in [0, 1]
        white = torch.ones(3, 1, 1)
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32).view(3, 1, 1) / 255
        alpha = ((white - image) / (white - colour)).mean(0)  # coverage per pixel
        area = float(alpha.sum())
        ratios.append(math.sqrt(area / (SHAPE_AREAS[obj.shape] * SIZES[obj.size] ** 2)))
    ratios = np.array(ratios)
    assert ratios.min() > lo - 0.03 and ratios.max() < hi + 0.03  # rounding to uint8 and edge sampling
    assert ratios.min() < lo + 0.15 and ratios.max() > hi - 0.15


def test_flip_mirrors_the_unflipped_render():
    """flip only: every image equals the plain render mirrored left-right and/or top-bottom, and both occur."""
    plain = ShapesDataset("train", size=32, num_samples=40)
    flipped = ShapesDataset("train", size=32, num_samples=40, flip=True)
    seen = set()
    for i in range(40):
        a, b = plain[i]["image"], flipped[i]["image"]
        matches = [(lr, tb) for lr in (False, True) for tb in (False, True)
                   if torch.equal(b, a.flip([d for d, on in ((2, lr), (1, tb)) if on]) if (lr or tb) else a)]
        assert matches
        seen.update(matches)
    assert len(seen) >= 3


def test_augmentation_arguments_are_checked():
    with pytest.raises(ValueError, match="extent_range"):
        ShapesDataset("train", extent_range=[1.5, 0.5])
    with pytest.raises(ValueError, match="shift"):
        ShapesDataset("train", shift=-1)
