"""Captioned image data sets read from local files (nothing is downloaded), in three layouts:

- `TextCaptionFolder(root)`: every image under `root` with a same-name `.txt` beside it (`cat.png` + `cat.txt`);
  each non-empty line of the text file is one caption.
- `MetadataCaptionFolder(root)`: `root/metadata.jsonl` with one {"file_name": relative path, "text": str or
  list of str} per line (the Hugging Face `imagefolder` layout).
- `CocoCaptions(image_dir, annotation_file)`: COCO caption JSON (captions_train2017.json: "images" with id and
  file_name, "annotations" with image_id and caption) and its image folder.

Items are {"image": FloatTensor [3, size, size] in [-1, 1] (shorter side resized, centre crop), "caption": str}.
With several captions per image one is drawn per (seed, epoch, index), without the global RNG: call
`set_epoch(e)` at each epoch to vary it. Unreadable images are skipped as in ImageFolder (counted in
`num_skipped`, logged). Every image and caption file must resolve (symlinks followed) to a path under the data
root: an entry that leaves it (`../x.png`, an absolute path, a link to a system file) is refused with the line or
entry that names it, so a caption folder cannot read files from elsewhere. `fingerprint()` hashes the relative paths, sizes and mtimes of the images and caption
files (and the image size), so a token cache can tell that its data set changed.
"""

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .images import IMAGE_EXTENSIONS, NOTHING_DOWNLOADED, ImageFolder, _to_rgb, resize_center_crop

logger = logging.getLogger(__name__)


class FolderEscapeError(UserError, ValueError):
    """A caption folder entry whose file lies outside the data root."""


def confined(root: Path, path: Path, where: str) -> Path:
    """`path` when it resolves, symlinks followed, to a place under `root`; else a FolderEscapeError naming `where`."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise FolderEscapeError(f"{where}: {path} leads to {resolved}, outside the data root {root}; refused")
    return path


def epoch_and_index(item: "int | tuple[int, int]", default_epoch: int) -> tuple[int, int]:
    """An item key of a data set with per-epoch captions: an index, or (epoch, index) as the training loader
    passes it (so that worker processes, which never see `set_epoch`, draw that epoch's caption)."""
    return (int(item[0]), int(item[1])) if isinstance(item, tuple) else (default_epoch, int(item))


def choose_caption(captions: Sequence[str], seed: int, epoch: int, index: int) -> str:
    """One of an item's captions, drawn deterministically from (seed, epoch, index)."""
    if len(captions) == 1:
        return captions[0]
    return captions[int(np.random.default_rng((seed, epoch, index)).integers(len(captions)))]


def files_fingerprint(root: Path, files: Sequence[Path], extra: str = "") -> str:
    """sha256 over (path relative to root, size, mtime in ns) of each file, plus `extra`."""
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\n{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class CaptionedImages(Dataset):
    """Images with one or more captions each; the subclasses only say which files and captions."""

    def __init__(self, root: Path, entries: Sequence[tuple[Path, list[str]]], caption_files: Sequence[Path],
                 size: int, seed: int = 0):
        self.root, self.size, self.seed, self.epoch = Path(root), size, seed, 0
        self.caption_files = list(caption_files)
        readable = [(path, captions) for path, captions in entries if captions and ImageFolder._readable(path)]
        self.num_skipped = len(entries) - len(readable)
        if self.num_skipped:
            logger.warning("%s %s: skipped %d image(s) that are unreadable or have no caption",
                           type(self).__name__, root, self.num_skipped)
        if not readable:
            raise FileNotFoundError(f"{type(self).__name__}: no readable captioned images in {root} "
                                    f"({len(entries)} candidate(s)). {NOTHING_DOWNLOADED}")
        self.files = [path for path, _ in readable]
        self.captions = [captions for _, captions in readable]

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of epoch `epoch` from now on."""
        self.epoch = epoch

    def all_captions(self, index: int) -> list[str]:
        return list(self.captions[index])

    def caption(self, index: int, epoch: int | None = None) -> str:
        return choose_caption(self.captions[index], self.seed, self.epoch if epoch is None else epoch, index)

    def fingerprint(self) -> str:
        """Changes when an image or caption file is added, removed or modified, or when `size` changes."""
        files = sorted(set(self.files) | set(self.caption_files))
        return files_fingerprint(self.root, files, f"{type(self).__name__} size={self.size}")

    def _load(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            image.load()
            return resize_center_crop(_to_rgb(image), self.size).clamp(0, 1) * 2 - 1

    def __getitem__(self, item: "int | tuple[int, int]") -> dict:
        epoch, index = epoch_and_index(item, self.epoch)
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = self._load(i)
            except Exception as error:  # truncated files fail only when decoded; skip as ImageFolder does
                self.num_skipped += 1
                logger.warning("%s: skipping %s: %s", type(self).__name__, self.files[i], error)
                continue
            return {"image": image, "caption": self.caption(i, epoch)}
        raise RuntimeError(f"{type(self).__name__}: none of the {len(self.files)} files could be decoded")


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TextCaptionFolder(CaptionedImages):
    """Images under `root` (any depth), each captioned by the lines of the same-name .txt file beside it."""

    def __init__(self, root, size: int, seed: int = 0, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"caption folder {root} does not exist: put images there, each with a "
                                    f"same-name .txt caption file. {NOTHING_DOWNLOADED}")
        images = sorted(confined(root, p, str(p)) for p in root.rglob("*")
                        if p.is_file() and p.suffix.lower() in extensions)
        texts = [confined(root, path.with_suffix(".txt"), str(path)) for path in images]
        entries = [(image, _lines(text) if text.is_file() else []) for image, text in zip(images, texts)]
        super().__init__(root, entries, [text for text in texts if text.is_file()], size, seed)


class MetadataCaptionFolder(CaptionedImages):
    """`root/metadata.jsonl` lines {"file_name": path relative to root, "text": a caption or a list of them}."""

    METADATA = "metadata.jsonl"

    def __init__(self, root, size: int, seed: int = 0):
        root = Path(root)
        metadata = root / self.METADATA
        if not metadata.is_file():
            raise FileNotFoundError(f"{metadata} not found: expected one JSON object per line with "
                                    f"'file_name' and 'text'. {NOTHING_DOWNLOADED}")
        entries = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, text = record["file_name"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{metadata}:{number}: expected {{\"file_name\": ..., \"text\": ...}}, "
                                 f"got {line[:200]!r} ({error})") from error
            captions = [text] if isinstance(text, str) else list(text)
            image = confined(root, root / str(name), f"{metadata}:{number}")
            entries.append((image, [c.strip() for c in captions if c.strip()]))
        super().__init__(root, entries, [metadata], size, seed)


class CocoCaptions(CaptionedImages):
    """COCO captions: `annotation_file` (captions_*2017.json) names the images of `image_dir` and their captions."""

    def __init__(self, image_dir, annotation_file, size: int, seed: int = 0):
        image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        for path, what in ((image_dir, "image folder"), (annotation_file, "caption annotation file")):
            if not path.exists():
                raise FileNotFoundError(f"COCO {what} {path} not found (e.g. train2017/ and "
                                        f"annotations/captions_train2017.json from cocodataset.org). "
                                        f"{NOTHING_DOWNLOADED}")
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{annotation_file} is not a COCO caption file: it needs 'images' and 'annotations'")
        captions: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
        images = sorted(data["images"], key=lambda image: image["id"])
        entries = [(confined(image_dir, image_dir / image["file_name"], f"{annotation_file} image id {image['id']}"),
                    captions.get(image["id"], [])) for image in images]
        super().__init__(image_dir, entries, [], size, seed)
        self.annotation_file = annotation_file

    def fingerprint(self) -> str:
        stat = self.annotation_file.stat()
        extra = f"{self.annotation_file.name}\t{stat.st_size}\t{stat.st_mtime_ns}"
        return files_fingerprint(self.root, self.files, f"CocoCaptions size={self.size} {extra}")


def caption_folder(root, size: int, seed: int = 0) -> CaptionedImages:
    """MetadataCaptionFolder when `root` holds metadata.jsonl, else TextCaptionFolder."""
    root = Path(root)
    if (root / MetadataCaptionFolder.METADATA).is_file():
        return MetadataCaptionFolder(root, size, seed)
    return TextCaptionFolder(root, size, seed)
