"""Caption folders are confined: an image or caption file that resolves outside the data root (by `..`, an
absolute path or a symlink) is refused, naming the line or entry, instead of being read into training."""

import json

import pytest
from PIL import Image

from vqdiff.data.captions import CocoCaptions, FolderEscapeError, MetadataCaptionFolder, TextCaptionFolder


@pytest.fixture
def layout(tmp_path):
    """root/ with one good image, and outside/x.png next to it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root, outside):
        folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "good.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(outside / "x.png")
    (outside / "secret.txt").write_text("a line of a system file\n")
    return root, outside


def write_metadata(root, names):
    lines = [json.dumps({"file_name": name, "text": "a caption"}) for name in names]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("escape", ["../outside/x.png", "absolute"])
def test_metadata_entries_outside_the_root_are_refused_with_their_line(layout, escape):
    root, outside = layout
    write_metadata(root, ["good.png", str(outside / "x.png") if escape == "absolute" else escape])
    with pytest.raises(FolderEscapeError, match=r"metadata.jsonl:2: .*outside the data root"):
        MetadataCaptionFolder(root, size=8)
    (root / "sub").mkdir()
    write_metadata(root, ["good.png", "./sub/../good.png"])  # `..` that stays inside is fine
    assert len(MetadataCaptionFolder(root, size=8)) == 2


def test_a_symlinked_image_in_metadata_is_refused(layout):
    root, outside = layout
    (root / "link.png").symlink_to(outside / "x.png")
    write_metadata(root, ["good.png", "link.png"])
    with pytest.raises(FolderEscapeError, match=r"metadata.jsonl:2"):
        MetadataCaptionFolder(root, size=8)


def test_a_caption_file_linked_to_a_system_file_is_refused(layout):
    root, outside = layout
    (root / "good.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(FolderEscapeError, match=r"good.png: .*good.txt leads to .*secret.txt"):
        TextCaptionFolder(root, size=8)
    (root / "good.txt").unlink()
    (root / "good.txt").write_text("red\n")
    assert TextCaptionFolder(root, size=8).all_captions(0) == ["red"]


def test_a_linked_image_in_a_text_folder_is_refused(layout):
    root, outside = layout
    (root / "good.txt").write_text("red\n")
    (root / "other.png").symlink_to(outside / "x.png")
    with pytest.raises(FolderEscapeError, match="other.png"):
        TextCaptionFolder(root, size=8)


def test_coco_file_names_outside_the_image_folder_are_refused(layout, tmp_path):
    root, _ = layout
    annotations = {"images": [{"id": 1, "file_name": "good.png"}, {"id": 2, "file_name": "../outside/x.png"}],
                   "annotations": [{"image_id": 1, "caption": "red"}, {"image_id": 2, "caption": "blue"}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    with pytest.raises(FolderEscapeError, match="image id 2"):
        CocoCaptions(root, tmp_path / "captions.json", size=8)
