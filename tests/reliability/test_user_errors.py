"""Degenerate options are refused with one line naming the key and its range, and every entry point turns a
user error into one line on stderr and exit code 2 (a traceback only with --debug, or for a real bug)."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vqdiff import build, cli
from vqdiff.config import ConfigError, load_config, save_config
from vqdiff.errors import run_main
from vqdiff.train import tasks
from vqdiff.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.log_every=0", "train.log_every"), ("train.adam_betas=[0.9]", "train.adam_betas"),
    ("train.max_steps=0", "train.max_steps"), ("train.ema_decay=1.5", "train.ema_decay"),
    ("train.ema_decay=1.0", "train.ema_decay"), ("transformer.width=0", "transformer.width"),
    ("transformer.num_heads=3", "transformer.num_heads"), ("sample.truncation_rate=0", "sample.truncation_rate"),
    ("sample.temperature=0", "sample.temperature"), ("sample.guidance_scale=.nan", "sample.guidance_scale"),
    ("gaussian.num_timesteps=0", "gaussian.num_timesteps"), ("unet.dropout=1", "unet.dropout"),
    ("train.lr=-1", "train.lr"), ("vqvae.temperature_end=0", "vqvae.temperature_end"),
])
def test_out_of_range_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}") as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_every_shipped_config_is_in_range():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("vq")
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml", [
        f"out_dir={tmp / 'run'}", f"tokenizer.path={tokenizer_dir}", "train.max_steps=1", "train.sample_every=0",
        "data.batch_size=2", "data.num_samples=8", "transformer.width=32", "transformer.num_heads=2",
        "transformer.num_layers=1", "discrete.num_timesteps=4", "sample.steps=null", "data.tokens=null"])
    tasks.seed_everything(0)
    return train(cfg, tasks.build_task(cfg), build.build_train_dataset(cfg), progress=False)


def errors_logged(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("options, needle", [
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"), (["--n", "0"], "--n"),
    (["--steps", "abc"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", "0"], "--steps"),
    (["--truncation", "0"], "--truncation"), (["--truncation", "1.5"], "--truncation"),
    (["--temperature", "0"], "--temperature"),
])
def test_degenerate_sampling_options_write_nothing(vq_run, tmp_path, caplog, options, needle):
    out = tmp_path / "s.png"
    assert cli.main(["sample", "a red circle", "--model", str(vq_run), "--out", str(out), *options]) == 2
    (message,) = errors_logged(caplog)
    assert needle in message and "allowed" in message and not out.exists()


def test_a_mask_of_another_size_gives_both_sizes(vq_run, tmp_path, caplog):
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    Image.new("L", (48, 40)).save(tmp_path / "mask.png")
    out = tmp_path / "s.png"
    assert cli.main(["sample", "a red circle", "--model", str(vq_run), "--init-image", str(tmp_path / "image.png"),
                     "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--out", str(out)]) == 2
    (message,) = errors_logged(caplog)
    assert "48x40" in message and "32x32" in message and not out.exists()


def test_other_degenerate_commands(tmp_path, caplog):
    out = tmp_path / "s.png"
    assert cli.main(["sample-ddpm", "--checkpoint", str(tmp_path), "--n", "0", "--out", str(out)]) == 2
    assert cli.main(["eval-shapes", "--checkpoint", str(tmp_path), "--batch-size", "0"]) == 2
    assert cli.main(["train", "--config", "configs/ddpm_scurve.yaml", f"out_dir={tmp_path / 'r'}",
                     "train.max_steps=0"]) == 2
    messages = errors_logged(caplog)
    assert "--n: 0" in messages[0] and "--batch-size: 0" in messages[1] and "train.max_steps: 0" in messages[2]
    assert not out.exists() and not (tmp_path / "r").exists()


def test_a_folder_of_the_wrong_kind_says_what_it_holds(tokenizer_dir, tmp_path, caplog):
    assert cli.main(["sample", "a red circle", "--model", str(tokenizer_dir)]) == 2
    tokenizer_run = tmp_path / "vqvae_run"
    tokenizer_run.mkdir()
    save_config(load_config(ROOT / "configs/vqvae_tiny.yaml"), tokenizer_run / "config.yaml")
    assert cli.main(["sample", "a red circle", "--model", str(tokenizer_run)]) == 2
    first, second = errors_logged(caplog)
    assert "holds a tokenizer, not a text-to-image model" in first
    assert "holds a tokenizer run (model: vqvae), not a text-to-image model" in second


@pytest.mark.parametrize("error, code", [
    (PermissionError(errno.EACCES, "Permission denied", "/x"), 2), (OSError(errno.ENOSPC, "No space left"), 2),
    (FileNotFoundError("missing"), 2), (ConfigError("a\n  b: 1\n  c: 2"), 2)])
def test_run_main_turns_user_errors_into_exit_code_2(error, code, caplog):
    def fail(argv):
        raise error

    assert run_main(fail, []) == code
    (message,) = errors_logged(caplog)
    assert "\n" not in message


def test_run_main_keeps_the_traceback_of_a_bug():
    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_main(bug, [])


def command(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_commands_and_scripts_print_one_line_and_exit_2(tmp_path):
    missing = str(tmp_path / "nowhere")
    for args in (["-m", "vqdiff.cli", "sample-ddpm", "--checkpoint", missing],
                 ["scripts/train_ddpm.py", "--config", "configs/ddpm_scurve.yaml", "data.batch_size=0"]):
        result = command(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    debug = command("-m", "vqdiff.cli", "sample-ddpm", "--checkpoint", missing, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    debug = command("scripts/train_ddpm.py", "--config", "configs/ddpm_scurve.yaml", "data.batch_size=0",
                    env={"VQDIFF_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "data.batch_size" in debug.stderr
