"""A token cache: a data set encoded once by a tokenizer, read back memory-mapped for VQ-Diffusion training.

    <dir>/tokens.npy       [N, h, w] token ids, uint16 when num_classes <= 65535 else int32
    <dir>/captions.jsonl   one JSON list of every caption of image i per line
    <dir>/meta.json        h, w, num_classes, tokenizer (sha256 of its model.safetensors), fingerprint, count

`write_tokens` takes an `encode` callable (images [B, 3, H, W] -> ids [B, h, w]), so this module never imports a
model. `TokenDataset` refuses a cache whose data set or tokenizer differs from the expected one.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import UserError
from .captions import choose_caption, epoch_and_index
from .shapes import ShapesDataset

TOKENS_FILE, CAPTIONS_FILE, META_FILE = "tokens.npy", "captions.jsonl", "meta.json"
UINT16_MAX_CLASSES = 65535
CACHE_VERSION = 1


def file_sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(directory: "str | Path") -> str:
    """sha256 of a tokenizer directory's model.safetensors: what a token cache records as its tokenizer."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tokenizer directory")
    return file_sha256(path)


def dataset_fingerprint(dataset) -> str:
    """The data set's `fingerprint()`, or for ShapesDataset a hash of what defines its items."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    if isinstance(dataset, ShapesDataset):
        fields = {name: getattr(dataset, name) for name in
                  ("split", "size", "num_samples", "seed", "max_objects", "paraphrase", "supersample")}
        return hashlib.sha256(json.dumps({"ShapesDataset": fields}, sort_keys=True).encode()).hexdigest()
    raise TypeError(f"cannot fingerprint a {type(dataset).__name__}: give it a fingerprint() method")


def all_captions(dataset, index: int) -> list[str]:
    """Every caption of item `index`, without decoding its image where the data set allows."""
    if hasattr(dataset, "all_captions"):
        return dataset.all_captions(index)
    if hasattr(dataset, "caption"):
        return [dataset.caption(index)]
    return [dataset[index]["caption"]]


def _stack_images(items) -> torch.Tensor:
    return torch.stack([item["image"] for item in items])


def write_tokens(dataset, encode: Callable[[torch.Tensor], torch.Tensor], out_dir: "str | Path", *,
                 num_classes: int, tokenizer: str, fingerprint: str | None = None, batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True) -> Path:
    """Encode every image of `dataset` (items with "image" and "caption") into a cache at `out_dir` (replaced
    whole when complete). `tokenizer` is the tokenizer hash; `fingerprint` defaults to the data set's."""
    out_dir = Path(out_dir)
    fingerprint = dataset_fingerprint(dataset) if fingerprint is None else fingerprint
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if num_classes <= UINT16_MAX_CLASSES else np.int32
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_stack_images)
    tokens, start = None, 0
    for images in tqdm(loader, desc="encoding", disable=not progress):
        ids = encode(images).cpu()  # [B, h, w]
        if ids.dim() != 3 or ids.shape[0] != len(images):
            raise ValueError(f"encode must return token ids [B, h, w], got {list(ids.shape)} for {len(images)} images")
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"encode returned ids in [{int(ids.min())}, {int(ids.max())}], "
                             f"outside [0, num_classes={num_classes})")
        if tokens is None:
            tokens = np.lib.format.open_memmap(tmp / TOKENS_FILE, mode="w+", dtype=dtype,
                                               shape=(len(dataset), *ids.shape[1:]))
        tokens[start:start + len(ids)] = ids.numpy().astype(dtype)
        start += len(ids)
    if tokens is None:
        raise ValueError("the data set is empty: nothing to encode")
    tokens.flush()
    with open(tmp / CAPTIONS_FILE, "w", encoding="utf-8") as f:
        for index in range(len(dataset)):
            f.write(json.dumps(all_captions(dataset, index), ensure_ascii=False) + "\n")
    meta = {"version": CACHE_VERSION, "count": len(dataset), "h": tokens.shape[1], "w": tokens.shape[2],
            "num_classes": num_classes, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer,
            "fingerprint": fingerprint}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    del tokens
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


class CacheMismatch(UserError, ValueError):
    """A token cache made from another data set or tokenizer than the expected one."""


class TokenDataset(Dataset):
    """Items {"tokens": LongTensor [h*w], "caption": str} from a cache written by `write_tokens`.

    `expect_fingerprint` (a data set fingerprint) and `expect_tokenizer` (a tokenizer hash, or the tokenizer
    directory) are checked against meta.json. One caption is drawn per (seed, epoch, index); `set_epoch` moves on.
    """

    def __init__(self, directory: "str | Path", expect_fingerprint: str | None = None,
                 expect_tokenizer: "str | Path | None" = None, seed: int = 0):
        self.directory, self.seed, self.epoch = Path(directory), seed, 0
        for name in (TOKENS_FILE, CAPTIONS_FILE, META_FILE):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"token cache {self.directory} has no {name}: write it with "
                                        f"scripts/encode_tokens.py")
        self.meta = json.loads((self.directory / META_FILE).read_text())
        if expect_fingerprint is not None and expect_fingerprint != self.meta["fingerprint"]:
            raise CacheMismatch(f"token cache {self.directory}: the data set changed after encoding (fingerprint "
                                f"{self.meta['fingerprint'][:12]}... in the cache, {expect_fingerprint[:12]}... now); "
                                f"re-run scripts/encode_tokens.py")
        if expect_tokenizer is not None:
            expected = tokenizer_hash(expect_tokenizer) if Path(expect_tokenizer).is_dir() else str(expect_tokenizer)
            if expected != self.meta["tokenizer"]:
                raise CacheMismatch(f"token cache {self.directory}: the tokenizer changed after encoding (sha256 "
                                    f"{self.meta['tokenizer'][:12]}... in the cache, {expected[:12]}... now); "
                                    f"re-run scripts/encode_tokens.py")
        self.tokens = np.load(self.directory / TOKENS_FILE, mmap_mode="r")  # [N, h, w]
        with open(self.directory / CAPTIONS_FILE, encoding="utf-8") as f:
            self.captions = [json.loads(line) for line in f]
        if not len(self.tokens) == len(self.captions) == self.meta["count"]:
            raise ValueError(f"token cache {self.directory} is inconsistent: {len(self.tokens)} token rows, "
                             f"{len(self.captions)} caption lines, count {self.meta['count']}")

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.meta["h"], self.meta["w"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: "int | tuple[int, int]") -> dict:
        epoch, index = epoch_and_index(item, self.epoch)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        tokens = torch.from_numpy(self.tokens[index].astype(np.int64)).flatten()  # [h*w]
        return {"tokens": tokens, "caption": choose_caption(self.captions[index], self.seed, epoch, index)}
