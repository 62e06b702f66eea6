"""CIFAR-10 / MNIST readers on tiny fake files in the real formats, and the image folder on every PIL mode."""

import gzip
import logging
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vqdiff.data.images import CIFAR10, MNIST, ImageFolder, resize_center_crop


def write_cifar(root, per_batch=3, seed=0):
    """cifar-10-batches-py/ as in the official archive: pickled dicts with bytes keys, data [N, 3072] uint8."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        raw = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                            b"filenames": [b"x.png"] * per_batch}, protocol=2)
        # the real files were pickled by numpy 1.x, whose arrays refer to numpy.core.multiarray
        (folder / name).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        batches[name] = (data, labels)
    return batches


def test_cifar_pixels_and_labels(tmp_path):
    batches = write_cifar(tmp_path)
    train = CIFAR10(tmp_path)
    assert len(train) == 15
    data, labels = batches["data_batch_2"]
    item = train[4]  # second image of the second batch
    assert item["label"] == labels[1]
    image = item["image"]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 3)]:  # 1024 red, 1024 green, 1024 blue, row-major
        assert image[c, h, w].item() == pytest.approx(data[1, 1024 * c + 32 * h + w] / 127.5 - 1, abs=1e-6)
    assert image.min() >= -1 and image.max() <= 1
    test = CIFAR10(tmp_path / "cifar-10-batches-py", train=False)
    assert len(test) == 3 and [test[i]["label"] for i in range(3)] == batches["test_batch"][1]


def test_cifar_class_filter(tmp_path):
    batches = write_cifar(tmp_path, per_batch=20)
    all_labels = [label for name in [f"data_batch_{i}" for i in range(1, 6)] for label in batches[name][1]]
    subset = CIFAR10(tmp_path, classes=[3, 5])
    assert len(subset) == sum(label in (3, 5) for label in all_labels) > 0
    assert {subset[i]["label"] for i in range(len(subset))} <= {3, 5}
    with pytest.raises(ValueError, match="classes"):
        CIFAR10(tmp_path, classes=[10])


def test_cifar_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10(tmp_path)
    message = str(error.value)
    assert "cifar-10-batches-py" in message and "data_batch_5" in message and "test_batch" in message
    assert "Nothing is downloaded" in message and str(tmp_path) in message


def test_cifar_refuses_foreign_pickles(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": print}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        CIFAR10(tmp_path)


def test_horizontal_flip_uses_the_generator(tmp_path):
    write_cifar(tmp_path)
    plain = CIFAR10(tmp_path)
    flipped = [CIFAR10(tmp_path, flip=True, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    outcomes = []
    for i in range(len(plain)):
        a, b, original = flipped[0][i]["image"], flipped[1][i]["image"], plain[i]["image"]
        assert torch.equal(a, b)  # same seed, same draws
        assert torch.equal(a, original) or torch.equal(a, original.flip(-1))
        outcomes.append(torch.equal(a, original))
    assert 0 < sum(outcomes) < len(outcomes)


def write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, gz: bool, n=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix in ("train", "t10k"):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz, layout", [(False, "."), (True, "."), (True, "MNIST/raw")])
def test_mnist_reads_idx_files(tmp_path, gz, layout):
    arrays = write_mnist(tmp_path / layout, gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        dataset = MNIST(tmp_path, train=train)
        images, labels = arrays[prefix]
        assert len(dataset) == 6
        item = dataset[2]
        assert item["image"].shape == (1, 28, 28) and item["label"] == labels[2]
        np.testing.assert_allclose(item["image"][0].numpy(), images[2] / 127.5 - 1, atol=1e-6)


def test_mnist_padding_and_classes(tmp_path):
    images, labels = write_mnist(tmp_path, gz=False, n=40)["train"]
    padded = MNIST(tmp_path, pad_to=32)[0]["image"]
    assert padded.shape == (1, 32, 32)
    np.testing.assert_allclose(padded[0, 2:30, 2:30].numpy(), images[0] / 127.5 - 1, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[0][border] == -1).all()  # background (0) padding
    subset = MNIST(tmp_path, classes=[labels[0]])
    assert len(subset) == int((labels == labels[0]).sum())
    assert all(subset[i]["label"] == labels[0] for i in range(len(subset)))


def test_mnist_missing_or_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        MNIST(tmp_path)
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "Nothing is downloaded" in message
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 28), np.uint8))  # 2-D: wrong header
    with pytest.raises(ValueError, match="3 dimensions"):
        MNIST(tmp_path)


def to_unit(rgb):
    """Expected [-1, 1] value of 8-bit channel values."""
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1


def write_every_mode(root):
    """One constant-colour image per PIL mode (some not square) and the colour each must become."""
    (root / "a").mkdir(parents=True)
    (root / "b" / "deeper").mkdir(parents=True)
    expected = {}
    Image.new("L", (20, 30), 51).save(root / "a" / "gray.png")
    expected["a/gray.png"] = [51, 51, 51]
    Image.new("RGB", (30, 20), (255, 0, 51)).save(root / "a" / "rgb.jpg", quality=100)
    expected["a/rgb.jpg"] = [255, 0, 51]
    Image.new("RGBA", (24, 24), (0, 0, 255, 102)).save(root / "b" / "rgba.png")  # alpha 0.4 over white
    expected["b/rgba.png"] = [153, 153, 255]
    Image.new("LA", (24, 24), (0, 0)).save(root / "b" / "la.png")  # fully transparent -> white
    expected["b/la.png"] = [255, 255, 255]
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(root / "b" / "deeper" / "palette.png")
    expected["b/deeper/palette.png"] = [10, 20, 30]
    palette.save(root / "b" / "deeper" / "palette_transparent.png", transparency=1)
    expected["b/deeper/palette_transparent.png"] = [255, 255, 255]
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(root / "b" / "cmyk.tiff")
    expected["b/cmyk.tiff"] = [255, 0, 255]
    Image.new("I;16", (24, 24), 13107).save(root / "sixteen_bit.png")  # 13107 / 65535 = 0.2
    expected["sixteen_bit.png"] = [51, 51, 51]
    Image.new("1", (24, 24), 1).save(root / "a" / "bilevel.png")
    expected["a/bilevel.png"] = [255, 255, 255]
    return expected


def test_image_folder_every_mode_and_corrupt_files(tmp_path, caplog):
    expected = write_every_mode(tmp_path)
    (tmp_path / "a" / "garbage.png").write_bytes(b"not an image at all" * 10)
    whole = (tmp_path / "a" / "gray.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING, logger="vqdiff.data.images"):
        dataset = ImageFolder(tmp_path, size=8)
    assert dataset.num_skipped == 2 and "skipped 2" in caplog.text
    assert len(dataset) == len(expected)
    assert dataset.classes == [".", "a", "b"]
    for i, path in enumerate(dataset.files):
        name = path.relative_to(tmp_path).as_posix()
        item = dataset[i]
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        assert item["label"] == dataset.classes.index(name.split("/")[0] if "/" in name else ".")
        colour = to_unit(expected[name])[:, None, None].expand(3, 8, 8)
        tolerance = 2 / 127.5 if name.endswith(".jpg") else 1e-3  # JPEG's chroma rounding
        torch.testing.assert_close(item["image"], colour, rtol=0, atol=tolerance, msg=name)


def test_image_folder_replaces_files_that_fail_late(tmp_path, caplog):
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "0_good.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "1_good.png")
    dataset = ImageFolder(tmp_path, size=8)
    (tmp_path / "0_good.png").write_bytes(b"corrupted after the scan")
    with caplog.at_level(logging.WARNING, logger="vqdiff.data.images"):
        item = dataset[0]
    assert (item["image"] == 1).all()  # the next good item, not a crash
    assert dataset.num_skipped == 1 and "0_good.png" in caplog.text


def test_image_folder_resizes_shorter_side_and_crops_centre(tmp_path):
    """A 60 x 30 image of red / green / blue thirds: the centre crop of the 20 x 10 resize is the green third."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :20, 0] = pixels[:, 20:40, 1] = pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "thirds.png")
    image = ImageFolder(tmp_path, size=10)[0]["image"]
    assert image.shape == (3, 10, 10)
    torch.testing.assert_close(image[:, :, 2:8], to_unit([0, 255, 0])[:, None, None].expand(3, 10, 6),
                               rtol=0, atol=0.05)
    tall = torch.rand(3, 40, 10)
    torch.testing.assert_close(resize_center_crop(tall, 10), tall[:, 15:25])  # no resize needed: pure crop


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*Nothing is downloaded"):
        ImageFolder(tmp_path / "nowhere", size=8)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 nonsense")
    with pytest.raises(FileNotFoundError, match="no readable images"):
        ImageFolder(tmp_path, size=8)
