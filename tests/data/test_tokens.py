"""The token cache: written once through an `encode` callable, read back memory-mapped, guarded by the data
set fingerprint and the tokenizer hash."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.data.captions import TextCaptionFolder, choose_caption
from vqdiff.data.shapes import ShapesDataset
from vqdiff.data.tokens import CacheMismatch, TokenDataset, dataset_fingerprint, tokenizer_hash, write_tokens


def pool_encode(num_classes):
    """A stand-in tokenizer: 4x4 average pooling of the red channel, quantised to num_classes levels."""
    def encode(images):
        pooled = torch.nn.functional.avg_pool2d(images[:, :1], 4)[:, 0]  # [B, h, w] in [-1, 1]
        return ((pooled + 1) / 2 * (num_classes - 1)).round().long()
    return encode


def shapes(n=10, **kwargs):
    return ShapesDataset("val", size=16, num_samples=n, **{"seed": 0, **kwargs})


def fake_tokenizer(path, content=b"weights"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(content)
    return path


def test_round_trip_matches_direct_encoding(tmp_path):
    data, encode = shapes(), pool_encode(1000)
    tokenizer = tokenizer_hash(fake_tokenizer(tmp_path / "tok"))
    out = write_tokens(data, encode, tmp_path / "cache", num_classes=1000, tokenizer=tokenizer, batch_size=3,
                       progress=False)
    tokens = np.load(out / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and tokens.shape == (10, 4, 4)
    meta = json.loads((out / "meta.json").read_text())
    assert meta | {"fingerprint": None} == {"version": 1, "count": 10, "h": 4, "w": 4, "num_classes": 1000,
                                           "dtype": "uint16", "tokenizer": tokenizer, "fingerprint": None}
    cache = TokenDataset(out, expect_fingerprint=dataset_fingerprint(shapes()), expect_tokenizer=tmp_path / "tok")
    assert len(cache) == 10 and cache.grid_size == (4, 4) and cache.num_classes == 1000
    direct = encode(torch.stack([data[i]["image"] for i in range(10)]))
    assert direct.unique().numel() > 3  # the check below compares real content, not a constant
    for i in range(10):
        item = cache[i]
        assert item["tokens"].dtype == torch.long and torch.equal(item["tokens"], direct[i].flatten())
        assert item["caption"] == data[i]["caption"]
    assert not (tmp_path / "cache.tmp").exists()


def test_large_vocabularies_use_int32(tmp_path):
    out = write_tokens(shapes(4), lambda images: pool_encode(2)(images) + 70000, tmp_path / "cache",
                       num_classes=70002, tokenizer="x", progress=False)
    tokens = np.load(out / "tokens.npy")
    assert tokens.dtype == np.int32 and tokens.min() >= 70000
    assert TokenDataset(out)[0]["tokens"].min() >= 70000


def test_out_of_range_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, num_classes=2\)"):
        write_tokens(shapes(4), pool_encode(3), tmp_path / "cache", num_classes=2, tokenizer="x", progress=False)


def test_changed_data_set_or_tokenizer_is_refused(tmp_path):
    fake_tokenizer(tmp_path / "tok")
    out = write_tokens(shapes(), pool_encode(8), tmp_path / "cache", num_classes=8,
                       tokenizer=tokenizer_hash(tmp_path / "tok"), progress=False)
    for changed in (shapes(11), shapes(seed=1), shapes(max_objects=1), ShapesDataset("train", size=16, num_samples=10)):
        with pytest.raises(CacheMismatch, match="the data set changed after encoding.*re-run scripts/encode_tokens.py"):
            TokenDataset(out, expect_fingerprint=dataset_fingerprint(changed))
    fake_tokenizer(tmp_path / "tok", b"retrained weights")
    with pytest.raises(CacheMismatch, match="the tokenizer changed after encoding.*re-run scripts/encode_tokens.py"):
        TokenDataset(out, expect_tokenizer=tmp_path / "tok")
    with pytest.raises(CacheMismatch, match="tokenizer changed"):
        TokenDataset(out, expect_tokenizer="0" * 64)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        (out / "meta.json").unlink()
        TokenDataset(out)


def test_all_captions_are_kept_and_one_is_drawn_per_epoch(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for k in range(3):
        Image.new("RGB", (8, 8), (80 * k, 0, 0)).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text("\n".join(f"image {k} caption {j}" for j in range(5)))
    data = TextCaptionFolder(root, size=8)
    out = write_tokens(data, pool_encode(4), tmp_path / "cache", num_classes=4, tokenizer="x", progress=False)
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert lines == [[f"image {k} caption {j}" for j in range(5)] for k in range(3)]
    cache = TokenDataset(out, expect_fingerprint=data.fingerprint(), seed=0)
    fresh = TokenDataset(out, seed=0)
    drawn = []
    for epoch in range(12):
        cache.set_epoch(epoch)
        fresh.set_epoch(epoch)
        drawn.append(cache[1]["caption"])
        assert fresh[1]["caption"] == drawn[-1]  # a function of (seed, epoch, index) only
    assert set(drawn) <= set(lines[1]) and len(set(drawn)) > 1
    # the training loader hands out (epoch, index) keys, so the caption moves on per epoch without set_epoch
    # (which worker processes would never see)
    from types import SimpleNamespace
    from vqdiff.train.loop import make_loader
    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=3, num_workers=0), seed=0,
                          train=SimpleNamespace(max_steps=12))
    accelerator = SimpleNamespace(process_index=0, num_processes=1)
    per_epoch = [{} for _ in range(12)]
    for step, batch in enumerate(make_loader(TokenDataset(out, seed=0), cfg, 0, accelerator)):
        for caption in batch["caption"]:
            k = int(caption.split()[1])
            per_epoch[step][k] = caption
            assert caption == choose_caption(lines[k], 0, step, k)  # one step is one epoch of 3 items
    assert len({epoch[1] for epoch in per_epoch}) > 1
