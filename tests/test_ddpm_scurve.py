"""End to end on the 2-D S-curve: the Gaussian DDPM path learns, resumes exactly, and its CLI works."""

import pytest
import torch

from vqdiff import build, cli
from vqdiff.train import tasks
from vqdiff.config import load_config
from vqdiff.data.toy2d import sample_toy2d, sliced_wasserstein
from vqdiff.pipeline import DDPMPipeline
from vqdiff.io.checkpoint import CheckpointError, latest_checkpoint, load_weights
from vqdiff.train.loop import train


def scurve_config(tmp_path, name, steps, *extra):
    return load_config("configs/ddpm_scurve.yaml", [
        f"name={name}", f"out_dir={tmp_path / name}", f"train.max_steps={steps}", "train.log_every=50",
        "train.sample_every=0", "train.checkpoint_every=100000", "gaussian.num_timesteps=100",
        "data.num_samples=4000", *extra])


def run(cfg, **kwargs):
    tasks.seed_everything(cfg.seed)
    return train(cfg, tasks.build_task(cfg), build.build_dataset(cfg), progress=False, **kwargs)


@pytest.mark.slow
def test_scurve_ddpm_learns(tmp_path):
    cfg = scurve_config(tmp_path, "learn", 1500, "train.lr=2e-3", "train.ema_decay=0.99")
    run(cfg)
    pipe = DDPMPipeline.from_pretrained(cfg.run_dir)
    samples = pipe(n=2000, seed=1, progress=False)
    held_out = sample_toy2d("scurve", 2000, seed=123)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)).numpy()
    distance = sliced_wasserstein(samples, held_out)
    # reference points: the data against itself (~0.02) and unit Gaussian noise against the data (~0.3)
    baseline = sliced_wasserstein(noise, held_out)
    assert distance < 0.08, f"sliced W2 {distance:.3f} (noise baseline {baseline:.3f})"
    assert distance < baseline / 4


def test_resume_equals_straight_run(tmp_path):
    straight = scurve_config(tmp_path, "straight", 40)
    run(straight)
    first = scurve_config(tmp_path, "split", 20, "train.checkpoint_every=20")
    run(first)
    run(scurve_config(tmp_path, "split", 40), resume="auto")
    a = load_weights(latest_checkpoint(straight.run_dir) / "model.safetensors")
    b = load_weights(latest_checkpoint(first.run_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_from_other_config_is_refused(tmp_path):
    cfg = scurve_config(tmp_path, "a", 2)
    run(cfg)
    other = scurve_config(tmp_path, "a", 4, "mlp.hidden=64")
    with pytest.raises(CheckpointError, match="mlp.hidden: checkpoint 128 vs config 64"):
        run(other, resume="auto")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        run(scurve_config(tmp_path, "b", 2), resume=str(tmp_path / "nowhere"))


def test_cli_train_and_sample(tmp_path, caplog):
    run_dir = tmp_path / "cli"
    assert cli.main(["train", "--config", "configs/ddpm_scurve.yaml", f"out_dir={run_dir}", "train.max_steps=3",
                     "gaussian.num_timesteps=50", "--no-progress"]) == 0
    out = tmp_path / "s.png"
    assert cli.main(["sample-ddpm", "--checkpoint", str(run_dir), "--n", "50", "--steps", "5",
                     "--out", str(out), "--gif", str(tmp_path / "s.gif")]) == 0
    assert out.stat().st_size > 0 and (tmp_path / "s.gif").stat().st_size > 0
    assert cli.main(["train", "--config", "configs/ddpm_scurve.yaml", "train.max_stpes=3"]) == 2
    assert "unknown key(s) 'max_stpes'" in caplog.text
