import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from vqdiff.data.shapes import COLOURS, SPLITS, Object, ShapesDataset, caption, render, render_array
from vqdiff.eval.shapes import ATTRIBUTES, detect_objects, evaluate, image_array, score_image
from vqdiff.eval.shapes_grid import make_grid


def rendered(n_per_split, size=64, seed=11):
    """(uint8 image [H, W, 3], objects) from every split, with jitter and both sizes."""
    items = []
    for split in SPLITS:
        dataset = ShapesDataset(split, size=size, num_samples=n_per_split, seed=seed)
        for i in range(n_per_split):
            objects, offsets = dataset.scene(i)
            items.append((render_array(objects, size, offsets), objects))
    return items


@pytest.fixture(scope="module")
def ground_truth():
    return rendered(667)  # 2001 images


def jpeg(image, quality=75):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def blur(image, sigma=0.7):
    return np.clip(np.rint(gaussian_filter(image.astype(np.float64), (sigma, sigma, 0))), 0, 255).astype(np.uint8)


def test_ground_truth_scores_at_least_99_5_percent(ground_truth):
    images, objects = zip(*ground_truth)
    report = evaluate(images, [caption(o) for o in objects])
    total = report.groups["all"]
    assert total["images"] == 2001 and total["image"] >= 0.995
    assert min(total[name] for name in ATTRIBUTES) >= 0.995 and total["extra"] <= 0.005
    for group in ("1 object", "2 objects", "seen", "held-out", "held-out objects"):
        assert report.groups[group]["object"] >= 0.99, group


def test_wrong_pairings_score_near_zero(ground_truth):
    images, objects = zip(*ground_truth[::3])
    shifted = objects[1:] + objects[:1]  # each image against its neighbour's caption
    report = evaluate(images, shifted)
    assert report.groups["all"]["image"] <= 0.02
    # colour alone matches by chance about 1/6 of the time, never most of it
    assert report.groups["all"]["colour"] < 0.5


@pytest.mark.parametrize("degrade", [jpeg, blur], ids=["jpeg75", "blur0.7"])
def test_mild_degradation_keeps_97_percent(ground_truth, degrade):
    images, objects = zip(*ground_truth[::5])
    report = evaluate([degrade(image) for image in images], objects)
    assert report.groups["all"]["image"] >= 0.97


@pytest.mark.parametrize("size", [32, 128])
def test_other_canvas_sizes_score_clean_renders(size):
    images, objects = zip(*rendered(70, size=size, seed=5))
    assert evaluate(images, objects).groups["all"]["image"] >= 0.99


def test_image_formats_agree():
    dataset = ShapesDataset("val", num_samples=8, seed=2)
    for i in range(8):
        item = dataset[i]
        array = np.rint((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        formats = [item["image"], array, Image.fromarray(array), torch.from_numpy(array).permute(2, 0, 1)]
        detections = [detect_objects(image) for image in formats]
        assert all(d == detections[0] for d in detections)
        assert score_image(item["image"], item["caption"])["correct"]


def test_each_wrong_attribute_is_reported_alone():
    truth = Object("square", "red", "large", "left")
    image = render([truth])
    cases = {
        "shape": Object("circle", "red", "large", "left"),
        "size": Object("square", "red", "small", "left"),
        "position": Object("square", "red", "large", "top"),
        "colour": Object("square", "blue", "large", "left"),  # judged on the red region in its cell
    }
    for wrong, claimed in cases.items():
        result = score_image(image, [claimed])
        flags = {name: result["objects"][0][name] for name in ATTRIBUTES}
        assert flags == {name: name != wrong for name in ATTRIBUTES}, wrong
        assert not result["correct"]


def test_extra_and_missing_objects_fail_the_image():
    a = Object("triangle", "green", "small", "top right")
    b = Object("diamond", "purple", "large", "bottom")
    both = render([a, b])
    extra = score_image(both, [a])
    assert extra["objects"][0]["correct"] and len(extra["extra"]) == 1 and not extra["correct"]
    assert extra["extra"][0].colour == "purple" and extra["extra"][0].shape == "diamond"
    missing = score_image(render([a]), [a, b])
    assert missing["objects"][0]["correct"] and missing["objects"][1]["detection"] is None
    assert not any(missing["objects"][1][name] for name in ATTRIBUTES) and not missing["correct"]
    same_colour_twice = render([a, Object("square", "green", "small", "bottom left")])
    assert len(score_image(same_colour_twice, [a])["extra"]) == 1


def test_blank_and_grey_images_hold_no_objects():
    assert detect_objects(np.full((64, 64, 3), 255, np.uint8)) == []
    grey = np.full((64, 64, 3), 255, np.uint8)
    grey[10:40, 10:40] = 90  # dark grey is no palette colour
    assert detect_objects(grey) == []


def test_small_specks_are_not_objects():
    image = np.asarray(render([Object("circle", "blue", "large", "center")])).copy()
    image[5:7, 5:7] = COLOURS["red"]  # a 2x2 speck
    image[50, 10:40] = COLOURS["orange"]  # a 1-px line
    assert [d.colour for d in detect_objects(image)] == ["blue"]


def test_report_groups_and_table():
    items = rendered(4, seed=1)
    images, objects = zip(*items)
    report = evaluate(images, [caption(o) for o in objects])
    groups = report.groups
    assert groups["all"]["images"] == 12
    assert groups["seen"]["images"] + groups["held-out"]["images"] == 12
    assert groups["held-out"]["images"] >= 4  # every heldout-split image
    assert sum(groups[name]["images"] for name in groups if name.endswith(("object", "objects"))
               and name != "held-out objects") == 12
    for count in ("1 object", "2 objects"):
        seen, heldout = groups[f"{count} seen"], groups[f"{count} held-out"]
        assert seen["images"] + heldout["images"] == groups[count]["images"]
        mean = (seen["image"] * seen["images"] + heldout["image"] * heldout["images"]) / groups[count]["images"]
        assert mean == pytest.approx(groups[count]["image"])
    assert groups["all"]["objects"] == sum(len(o) for o in objects)
    assert groups["held-out objects"]["objects"] == sum(obj.heldout for o in objects for obj in o)
    assert len(report.scores) == 12
    json.dumps(report.to_dict())
    table = report.table()
    assert table.splitlines()[0].split()[:4] == ["group", "images", "objects", "colour"]
    assert "held-out objects" in table and "100.0" in table


def test_bad_inputs_raise_clear_errors():
    image = render([Object("circle", "red", "small", "top")])
    with pytest.raises(ValueError, match="cannot parse"):
        score_image(image, "a tiny red circle somewhere")
    with pytest.raises(ValueError, match="images for"):
        evaluate([image], [])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        image_array(torch.zeros(64, 64, 3))
    with pytest.raises(ValueError, match="uint8"):
        image_array(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(TypeError, match="cannot score"):
        image_array([[0]])


def test_grid_outlines_wrong_objects():
    truth = [Object("square", "red", "large", "center")]
    image = render(truth)
    wrong_caption = "a large red circle at the center"
    scores = [score_image(image, truth), score_image(image, wrong_caption)]
    grid = np.asarray(make_grid([image, image], [caption(truth), wrong_caption], scores, columns=2, tile=128))
    tile_width = 128 + 4
    box = scores[1]["objects"][0]["detection"].box  # (left, top, right, bottom) at 64 px
    left, top = 4 + tile_width + 2 * box[0] - 1, 4 + 2 * box[1]  # the outline's left edge in the second tile
    outline = grid[top + 10, left]
    assert tuple(outline) == (0, 0, 0)
    assert tuple(grid[top + 10, left - tile_width]) != (0, 0, 0)  # the correct tile has no outline
    no_scores = make_grid([image], ["a large red square at the center"])
    assert no_scores.size[0] < grid.shape[1]
