"""Divergence stops before it is saved: the guard looks at the loss, the gradient norm and the weights, and
a checkpoint is written only when its weights are finite and not exploded."""

import pytest
import torch

from vqdiff import build, cli
from vqdiff.config import load_config
from vqdiff.io.checkpoint import list_checkpoints, load_weights
from vqdiff.train import tasks
from vqdiff.train.guard import TrainingDiverged
from vqdiff.train.loop import train


def assert_every_checkpoint_sane(run, limit=1e3):
    for checkpoint in list_checkpoints(run):
        for name in ("model.safetensors", "ema.safetensors"):
            for key, value in load_weights(checkpoint / name).items():
                assert torch.isfinite(value).all() and value.abs().max() < limit, (checkpoint, name, key)


def test_huge_learning_rate_on_the_scurve_stops_at_once(tmp_path):
    # the case: train.lr=1e6 trained 40 steps to exit 0 with every checkpoint exploded
    cfg = load_config("configs/ddpm_scurve.yaml", [
        f"out_dir={tmp_path / 'r'}", "train.max_steps=40", "train.lr=1e6", "train.warmup_steps=0",
        "train.checkpoint_every=5", "train.sample_every=0", "gaussian.num_timesteps=50", "data.num_samples=600"])
    tasks.seed_everything(0)
    with pytest.raises(TrainingDiverged, match=r"at step \d+; stopped without saving. Last good checkpoint: none"):
        train(cfg, tasks.build_task(cfg), build.build_dataset(cfg), progress=False)
    assert list_checkpoints(cfg.run_dir) == []


def test_a_gradient_spike_with_finite_losses_stops_the_run(tiny):
    # from the 13th loss call on, the loss is a million times larger: finite, but its gradient explodes
    with pytest.raises(TrainingDiverged, match=r"gradient norm exploded at step 12.*Last good checkpoint: \S*"
                                               r"step_00000012"):
        tiny.run(20, task=tiny.task(scale_from=12, scale=1e6))
    run = tiny.config(20).run_dir
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008", "step_00000012"]
    assert_every_checkpoint_sane(run)


def test_exploded_weights_are_never_saved_and_the_last_good_one_resumes(tiny):
    tiny.run(4)
    # lr 1e4 from step 4 on: Adam moves every weight by ~1e4 a step; the losses stay finite
    with pytest.raises(TrainingDiverged, match=r"weights exploded after step 8.*Last good checkpoint: \S*"
                                               r"step_00000004"):
        tiny.run(12, "run", "train.lr=1e4", "train.guard_grad_factor=0", resume="auto")
    run = tiny.config(4).run_dir
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    assert_every_checkpoint_sane(run)
    tiny.run(12, resume="auto")  # the checkpoint it names is good: training goes on from it
    assert_every_checkpoint_sane(run)


def test_nan_weights_are_refused_when_loaded_and_nan_samples_are_not_written(tmp_path, caplog):
    run = tmp_path / "r"
    assert cli.main(["train", "--config", "configs/ddpm_scurve.yaml", f"out_dir={run}", "train.max_steps=2",
                     "gaussian.num_timesteps=50", "data.num_samples=600", "--no-progress"]) == 0
    # a checkpoint from before the guard, diverged: NaN in its EMA weights (written without a manifest)
    checkpoint = list_checkpoints(run)[-1]
    weights = load_weights(checkpoint / "ema.safetensors")
    weights[next(iter(weights))].fill_(float("nan"))
    from safetensors.torch import save_file
    save_file(weights, str(checkpoint / "ema.safetensors"))
    (checkpoint / "manifest.json").unlink()
    out = tmp_path / "s.png"
    assert cli.main(["sample-ddpm", "--checkpoint", str(run), "--n", "4", "--out", str(out)]) == 2
    assert "holds NaN weights" in caplog.text and "ema.safetensors" in caplog.text and not out.exists()


def test_the_gradient_test_is_relative_to_the_recent_median_and_spares_fp16_overflows():
    from vqdiff.config import TrainConfig
    from vqdiff.train.guard import MIN_HISTORY, DivergenceGuard

    def guard_after(norms, skip_infinite_grads=False):
        guard = DivergenceGuard(TrainConfig(guard_grad_factor=1000.0), None, skip_infinite_grads)
        for step, norm in enumerate(norms):
            guard.observe_grad_norm(torch.tensor(norm), step)
        guard.check_pending()

    guard_after([1.0] * MIN_HISTORY + [900.0])  # under 1000 x the median: a spike, not a divergence
    guard_after([1.0] * (MIN_HISTORY - 1) + [5000.0])  # too little history to judge
    with pytest.raises(TrainingDiverged, match="exploded at step 10: 2000"):
        guard_after([1.0] * MIN_HISTORY + [2000.0])
    guard_after([1.0, float("inf"), float("nan"), 1.0], skip_infinite_grads=True)  # the fp16 scaler skips those
    with pytest.raises(TrainingDiverged, match="gradient norm is inf at step 1"):
        guard_after([1.0, float("inf")])
