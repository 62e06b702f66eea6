"""Captioned image folders in the three layouts, written into tmp_path: items, bad files, caption draws,
fingerprints."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.data.captions import (CocoCaptions, MetadataCaptionFolder, TextCaptionFolder, caption_folder,
                                  choose_caption)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_image(path, colour, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_bad(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def expected_pixel(colour):
    return torch.tensor(colour, dtype=torch.float32) / 127.5 - 1


def test_text_folder_reads_lines_skips_bad_and_uncaptioned_files(tmp_path):
    write_image(tmp_path / "a" / "red.png", COLOURS["red"])
    (tmp_path / "a" / "red.txt").write_text("a red picture\n\n  all red  \n")
    write_image(tmp_path / "green.jpg", COLOURS["green"])
    (tmp_path / "green.txt").write_text("green\n")
    write_bad(tmp_path / "broken.png")
    (tmp_path / "broken.txt").write_text("never seen\n")
    write_image(tmp_path / "nocaption.png", COLOURS["blue"])
    data = TextCaptionFolder(tmp_path, size=4)
    assert len(data) == 2 and data.num_skipped == 2
    assert data.all_captions(0) == ["a red picture", "all red"] and data.all_captions(1) == ["green"]
    item = data[0]
    assert item["image"].shape == (3, 4, 4) and item["caption"] in ("a red picture", "all red")
    torch.testing.assert_close(item["image"][:, 1, 2], expected_pixel(COLOURS["red"]), atol=1e-5, rtol=0)
    assert data[1]["caption"] == "green"


def test_metadata_folder_accepts_strings_and_lists(tmp_path):
    write_image(tmp_path / "img" / "0.png", COLOURS["red"], size=(20, 10))
    write_image(tmp_path / "img" / "1.png", COLOURS["blue"])
    write_bad(tmp_path / "img" / "2.png")
    lines = [{"file_name": "img/0.png", "text": ["first", "second", "third"]},
             {"file_name": "img/1.png", "text": "blue one"},
             {"file_name": "img/2.png", "text": "broken"},
             {"file_name": "img/missing.png", "text": "missing"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = caption_folder(tmp_path, size=6)
    assert isinstance(data, MetadataCaptionFolder)
    assert len(data) == 2 and data.num_skipped == 2
    assert data.all_captions(0) == ["first", "second", "third"]
    assert data[1]["caption"] == "blue one"
    assert data[0]["image"].shape == (3, 6, 6)  # 20 x 10 -> shorter side 6, centre crop
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "img/0.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        MetadataCaptionFolder(tmp_path, size=6)


def test_coco_captions(tmp_path):
    write_image(tmp_path / "train2017" / "000000000009.jpg", COLOURS["green"])
    write_image(tmp_path / "train2017" / "000000000025.jpg", COLOURS["blue"])
    write_bad(tmp_path / "train2017" / "000000000030.jpg")
    annotations = {"images": [{"id": 25, "file_name": "000000000025.jpg"}, {"id": 9, "file_name": "000000000009.jpg"},
                              {"id": 30, "file_name": "000000000030.jpg"}],
                   "annotations": [{"image_id": 9, "id": 1, "caption": "green field "},
                                   {"image_id": 25, "id": 2, "caption": "blue sky"},
                                   {"image_id": 9, "id": 3, "caption": "a green square"},
                                   {"image_id": 30, "id": 4, "caption": "broken"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(annotations))
    data = CocoCaptions(tmp_path / "train2017", tmp_path / "annotations" / "captions_train2017.json", size=8)
    assert len(data) == 2 and data.num_skipped == 1
    assert data.all_captions(0) == ["green field", "a green square"]  # sorted by image id
    assert data[1]["caption"] == "blue sky"
    # JPEG may move a flat colour by one level
    torch.testing.assert_close(data[1]["image"][:, 4, 4], expected_pixel(COLOURS["blue"]), atol=2 / 255, rtol=0)
    with pytest.raises(FileNotFoundError, match="captions_val2017.json"):
        CocoCaptions(tmp_path / "train2017", tmp_path / "annotations" / "captions_val2017.json", size=8)


def test_caption_choice_is_deterministic_and_varies_by_epoch(tmp_path):
    captions = [f"caption {k}" for k in range(4)]
    draws = [choose_caption(captions, seed=0, epoch=e, index=i) for e in range(50) for i in range(4)]
    assert draws == [choose_caption(captions, seed=0, epoch=e, index=i) for e in range(50) for i in range(4)]
    counts = np.array([draws.count(c) for c in captions])
    assert counts.min() > 25  # 200 draws over 4 captions: each expected 50 times
    assert draws != [choose_caption(captions, seed=1, epoch=e, index=i) for e in range(50) for i in range(4)]
    write_image(tmp_path / "x.png", COLOURS["red"])
    (tmp_path / "x.txt").write_text("\n".join(captions))
    data = TextCaptionFolder(tmp_path, size=4, seed=3)
    per_epoch = []
    for epoch in range(20):
        data.set_epoch(epoch)
        per_epoch.append(data[0]["caption"])
        assert data[0]["caption"] == per_epoch[-1]  # same epoch, same caption, whatever the access order
    assert len(set(per_epoch)) > 1


def test_fingerprint_follows_the_files(tmp_path):
    write_image(tmp_path / "a.png", COLOURS["red"])
    (tmp_path / "a.txt").write_text("red\n")
    first = TextCaptionFolder(tmp_path, size=4).fingerprint()
    assert TextCaptionFolder(tmp_path, size=4).fingerprint() == first
    assert TextCaptionFolder(tmp_path, size=8).fingerprint() != first
    (tmp_path / "a.txt").write_text("red square\n")
    second = TextCaptionFolder(tmp_path, size=4).fingerprint()
    assert second != first
    write_image(tmp_path / "b.png", COLOURS["blue"])
    (tmp_path / "b.txt").write_text("blue\n")
    third = TextCaptionFolder(tmp_path, size=4).fingerprint()
    assert third != second
    stat = os.stat(tmp_path / "b.png")
    os.utime(tmp_path / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert TextCaptionFolder(tmp_path, size=4).fingerprint() not in (first, second, third)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextCaptionFolder(tmp_path / "nope", size=4)
    with pytest.raises(FileNotFoundError, match="no readable captioned images"):
        TextCaptionFolder(tmp_path, size=4)
