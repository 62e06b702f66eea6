"""Image data sets read from local files only (nothing is ever downloaded): CIFAR-10, MNIST, a folder of images.

Items are {"image": FloatTensor [C, H, W] in [-1, 1], "label": int}. `flip=True` adds random horizontal
flips drawn from `generator`. DataLoader workers each get an identical copy of a given generator, so their
flips would repeat each other: with several workers leave generator=None (torch seeds each worker apart).
"""

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

NOTHING_DOWNLOADED = "Nothing is downloaded: put the files there yourself."
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class _FlipMixin:
    """Random horizontal flip (probability 1/2) of a [C, H, W] tensor, off unless `flip`."""

    flip: bool
    generator: torch.Generator | None

    def _maybe_flip(self, image: torch.Tensor) -> torch.Tensor:
        if self.flip and torch.rand((), generator=self.generator) < 0.5:
            return image.flip(-1)
        return image


def _to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [C, H, W] -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def _filter_classes(images: torch.Tensor, labels: torch.Tensor, classes, num_classes: int, what: str):
    if classes is None:
        return images, labels
    classes = [int(c) for c in classes]
    if not classes or any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"{what}: classes must be a non-empty list of labels in [0, {num_classes}), got {classes}")
    keep = torch.isin(labels, torch.tensor(classes))
    return images[keep], labels[keep]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts but refuses any global other than what numpy arrays and bytes need,
    so a foreign pickle cannot run code. `_codecs.encode` rebuilds bytes in protocol-2 pickles from Python 3."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch file refers to {module}.{name}; not a CIFAR-10 file")
        return super().find_class(module, name)


class CIFAR10(_FlipMixin, Dataset):
    """CIFAR-10 from the "python version" batches (Krizhevsky 2009): 3 x 32 x 32 images, labels 0..9.

    `root` is the folder holding `cifar-10-batches-py/` (or that folder itself). `classes=[3]` keeps only
    those labels.
    """

    TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
    TEST_FILES = ("test_batch",)

    def __init__(self, root, train: bool = True, classes=None, flip: bool = False,
                 generator: torch.Generator | None = None):
        self.flip, self.generator = flip, generator
        folder = self._find_folder(Path(root))
        arrays, labels = [], []
        for name in self.TRAIN_FILES if train else self.TEST_FILES:
            data, batch_labels = self._read_batch(folder / name)
            arrays.append(data)
            labels.extend(batch_labels)
        images = torch.from_numpy(np.concatenate(arrays)).reshape(-1, 3, 32, 32)  # rows: 1024 R, 1024 G, 1024 B
        self.images, self.labels = _filter_classes(images, torch.tensor(labels, dtype=torch.long), classes, 10,
                                                   "CIFAR10")

    @classmethod
    def _find_folder(cls, root: Path) -> Path:
        expected = cls.TRAIN_FILES + cls.TEST_FILES
        for folder in (root / "cifar-10-batches-py", root):
            if all((folder / name).is_file() for name in expected):
                return folder
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected {root / 'cifar-10-batches-py'}/ holding {', '.join(expected)} "
            f"(extract the 'CIFAR-10 python version' archive cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html into {root} with `tar xzf`). {NOTHING_DOWNLOADED}")

    @staticmethod
    def _read_batch(path: Path) -> tuple[np.ndarray, list]:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"{path} is not a CIFAR-10 batch: no 'data' / 'labels' entries")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(batch["labels"]) != len(data):
            raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} "
                             f"and {len(batch['labels'])} labels")
        return data, list(batch["labels"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._maybe_flip(_to_unit_range(self.images[index])), "label": int(self.labels[index])}



def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format: big-endian header, unsigned bytes), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or file_ndim != ndim:
        raise ValueError(f"{path}: not an idx file of unsigned bytes with {ndim} dimensions "
                         f"(magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


class MNIST(_FlipMixin, Dataset):
    """MNIST from LeCun's idx files (optionally .gz): 1 x 28 x 28 digits, labels 0..9.

    `root` holds the idx files directly or in `MNIST/raw/` (torchvision's layout). `pad_to=32` pads the
    digits with background to 32 x 32 (DDPM-style UNets halve the size several times). `classes=[3]` keeps
    only those labels.
    """

    FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, root, train: bool = True, classes=None, pad_to: int | None = None, flip: bool = False,
                 generator: torch.Generator | None = None):
        self.flip, self.generator = flip, generator
        image_file, label_file = (self._find_file(Path(root), name) for name in self.FILES[train])
        images = torch.from_numpy(_read_idx(image_file, 3).copy())[:, None]  # [N, 1, 28, 28]
        labels = torch.from_numpy(_read_idx(label_file, 1).astype(np.int64))
        if len(images) != len(labels):
            raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
        if pad_to is not None:
            images = self._pad(images, pad_to)
        self.images, self.labels = _filter_classes(images, labels, classes, 10, "MNIST")

    @classmethod
    def _find_file(cls, root: Path, name: str) -> Path:
        for folder in (root, root / "MNIST" / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        expected = [n for pair in cls.FILES.values() for n in pair]
        raise FileNotFoundError(
            f"MNIST file {name} (or {name}.gz) not found in {root} or {root / 'MNIST' / 'raw'}: put the four idx "
            f"files {', '.join(expected)} (gzipped or not) there. {NOTHING_DOWNLOADED}")

    @staticmethod
    def _pad(images: torch.Tensor, size: int) -> torch.Tensor:
        height, width = images.shape[-2:]
        if size < max(height, width):
            raise ValueError(f"pad_to={size} is smaller than the images ({height} x {width})")
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(images, (left, size - width - left, top, size - height - top))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._maybe_flip(_to_unit_range(self.images[index])), "label": int(self.labels[index])}


def _to_rgb(image: Image.Image) -> torch.Tensor:
    """Any PIL mode -> float32 RGB [3, H, W] in [0, 1]; transparency is composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 32-bit "I" is read as 16-bit too
        gray = torch.from_numpy(np.asarray(image).astype(np.float32) / 65535).clamp(0, 1)  # 16-bit range
        return gray[None].expand(3, -1, -1).contiguous()
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        rgba = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        alpha = rgba[3:]
        return rgba[:3] * alpha + (1 - alpha)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [C, H, W] so the shorter side is `size` (antialiased bicubic), then crop the central size x size."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", antialias=True,
                              align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top:top + size, left:left + size]


class ImageFolder(_FlipMixin, Dataset):
    """Every image under `root` (any depth), as RGB `size` x `size` (shorter side resized, centre crop).

    Labels index the sorted first-level subfolders (`root/cat/...`, `root/dog/...`; files directly in
    `root` form a class named "."; see `self.classes`). Files that PIL cannot open or verify are skipped
    at construction, and one that still fails to decode later is replaced by the next good item; both are
    counted in `num_skipped` and logged, never raised.
    """

    def __init__(self, root, size: int, flip: bool = False, generator: torch.Generator | None = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        self.flip, self.generator, self.size = flip, generator, size
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist: put images ({', '.join(extensions)}) "
                                    f"under it, at any depth. {NOTHING_DOWNLOADED}")
        candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        self.files = [p for p in candidates if self._readable(p)]
        self.num_skipped = len(candidates) - len(self.files)
        if self.num_skipped:
            logger.warning("ImageFolder %s: skipped %d unreadable or corrupt file(s)", root, self.num_skipped)
        if not self.files:
            raise FileNotFoundError(f"no readable images ({', '.join(extensions)}) under {root} "
                                    f"({len(candidates)} candidate file(s) failed to open). {NOTHING_DOWNLOADED}")
        groups = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "." for p in self.files]
        self.classes = sorted(set(groups))
        self.labels = [self.classes.index(g) for g in groups]

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            with Image.open(path) as image:
                image.verify()
            return True
        except Exception as error:  # PIL raises many types for bad files; any of them means skip
            logger.debug("ImageFolder: cannot read %s: %s", path, error)
            return False

    def _load(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            image.load()
            return resize_center_crop(_to_rgb(image), self.size).clamp(0, 1) * 2 - 1

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                image = self._load(i)
            except Exception as error:  # decoding errors of truncated files surface only here
                self.num_skipped += 1
                logger.warning("ImageFolder: skipping %s: %s", self.files[i], error)
                continue
            return {"image": self._maybe_flip(image), "label": self.labels[i]}
        raise RuntimeError(f"ImageFolder: none of the {len(self.files)} files could be decoded")
