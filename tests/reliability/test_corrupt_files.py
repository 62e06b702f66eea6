"""Corrupt files are survived: every checkpoint carries a manifest (sizes, sha256) written last; `--resume auto`
walks back to the newest checkpoint that verifies and says what it skipped; every load error names the file;
an interrupted save leaves no partial folder."""

import errno
import json
import logging

import pytest
import torch

from vqdiff import cli
from vqdiff.io import checkpoint as checkpoint_module
from vqdiff.io.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_torch, load_weights,
                                     save_checkpoint)
from vqdiff.io.tokenizer import load_tokenizer


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def randomise(path):
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def empty(path):
    path.write_bytes(b"")


def test_a_checkpoint_lists_its_files_last(tiny):
    checkpoint = latest_checkpoint(tiny.run(4))
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["config.yaml", "ema.safetensors", "model.safetensors", "optimizer.pt", "state.pt"]
    assert all(manifest[name]["size"] == (checkpoint / name).stat().st_size for name in manifest)


@pytest.mark.parametrize("name, damage", [("model.safetensors", truncate), ("ema.safetensors", randomise),
                                          ("optimizer.pt", truncate), ("state.pt", empty)])
def test_resume_walks_back_to_the_newest_intact_checkpoint(tiny, caplog, name, damage):
    straight = tiny.run(12, "straight")
    run = tiny.run(8, "split")
    damage(run / "checkpoints" / "step_00000008" / name)
    with caplog.at_level(logging.INFO):
        tiny.run(12, "split", resume="auto")
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_00000008'}" in caplog.text and name in caplog.text
    assert "resumed from" in caplog.text and "step_00000004 at step 4" in caplog.text
    # resuming from step 4 retrains steps 4..12 exactly: the final weights equal the uninterrupted run's
    a = load_weights(latest_checkpoint(straight) / "model.safetensors")
    b = load_weights(latest_checkpoint(run) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_intact_checkpoint_is_an_error_naming_the_file(tiny):
    run = tiny.run(4)
    truncate(run / "checkpoints" / "step_00000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoint\(s\).*model.safetensors has \d+ bytes"):
        tiny.run(8, resume="auto")


@pytest.mark.parametrize("name, damage, load", [
    ("model.safetensors", truncate, load_weights), ("ema.safetensors", randomise, load_weights),
    ("optimizer.pt", truncate, load_torch), ("state.pt", empty, load_torch)])
def test_every_load_error_names_the_file(tiny, name, damage, load):
    checkpoint = latest_checkpoint(tiny.run(4))
    path = checkpoint / name
    damage(path)
    with pytest.raises(CheckpointError, match="manifest") as caught:  # checked against the manifest first
        load(path)
    assert str(path) in str(caught.value)
    (checkpoint / "manifest.json").unlink()  # a checkpoint from before manifests: the reader's own error
    with pytest.raises(CheckpointError, match="not a readable") as caught:
        load(path)
    assert str(path) in str(caught.value)


def test_a_corrupt_tokenizer_names_its_file(tokenizer_dir, tmp_path):
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    for file in tokenizer_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    truncate(broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{broken / 'model.safetensors'} is not a readable safetensors"):
        load_tokenizer(broken)


def test_sampling_a_corrupt_checkpoint_is_one_line(tmp_path, caplog):
    run = tmp_path / "r"
    assert cli.main(["train", "--config", "configs/ddpm_scurve.yaml", f"out_dir={run}", "train.max_steps=2",
                     "gaussian.num_timesteps=50", "data.num_samples=600", "--no-progress"]) == 0
    randomise(list_checkpoints(run)[-1] / "ema.safetensors")
    assert cli.main(["sample-ddpm", "--checkpoint", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "ema.safetensors" in errors[0] and "sha256" in errors[0]


def test_a_save_that_fails_leaves_no_partial_folder(tiny, monkeypatch):
    run = tiny.run(4)
    before = tiny.digests(run / "checkpoints")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, 8, tiny.config(8), {}, {}, {}, {})
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]
    assert tiny.digests(run / "checkpoints") == before


def test_an_interrupted_pipeline_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "pipeline"
    with pytest.raises(KeyboardInterrupt):
        with checkpoint_module.atomic_directory(target) as tmp:
            (tmp / "config.yaml").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
