"""The training loop on a tiny regression task: exact resume, NaN handling, checkpoint safety."""

import json
import os
import math

import pytest
import torch
from torch import nn

from vqdiff.config import load_config
from vqdiff.diffusion.timestep_sampler import ImportanceSampler
from vqdiff.io.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_weights
from vqdiff.train.loop import StepBatchSampler, TrainingDiverged, TrainTask, train

T = 8


class Points(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def make_task(poison_at=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 2))
    calls = {"n": 0}

    def losses(model, batch, t, generator):
        calls["n"] += 1
        x = batch["x"]
        noise = torch.randn(x.shape, generator=generator)
        out = model(torch.cat([x + noise, t[:, None].float() / T], dim=1))
        loss = ((out - x) ** 2).mean(dim=1) * (1 + t.float() / T)
        if poison_at is not None and calls["n"] > poison_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss}

    return TrainTask(model=model, losses=losses, time_sampler=ImportanceSampler(T, history=2),
                     num_timesteps=T)


def config(tmp_path, steps, name="run"):
    return load_config(None, [f"name={name}", f"out_dir={tmp_path / name}", f"train.max_steps={steps}",
                              "train.checkpoint_every=4", "train.log_every=2", "train.lr=0.01",
                              "train.ema_decay=0.9", "data.batch_size=8", "train.keep_checkpoints=3"])


def test_resume_gives_the_same_parameters(tmp_path):
    straight = train(config(tmp_path, 12, "straight"), make_task(), Points(), progress=False)
    train(config(tmp_path, 8, "split"), make_task(), Points(), progress=False)
    train(config(tmp_path, 12, "split"), make_task(), Points(), resume="auto", progress=False)
    a = load_weights(latest_checkpoint(straight) / "model.safetensors")
    b = load_weights(latest_checkpoint(tmp_path / "split") / "model.safetensors")
    ea = load_weights(latest_checkpoint(straight) / "ema.safetensors")
    eb = load_weights(latest_checkpoint(tmp_path / "split") / "ema.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0)
    # the importance sampler's history went through the checkpoint too
    sa = torch.load(latest_checkpoint(straight) / "state.pt", weights_only=True)["time_sampler"]
    sb = torch.load(latest_checkpoint(tmp_path / "split") / "state.pt", weights_only=True)["time_sampler"]
    assert torch.equal(sa["count"], sb["count"]) and sa["count"].sum() == 12 * 8
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12
    assert any(key.startswith("loss_q") for key in records[0])
    assert records[-1]["loss"] < records[0]["loss"]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, 20)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 6.*step_00000004"):
        train(cfg, make_task(poison_at=6), Points(), progress=False)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_00000004"]
    load_weights(latest_checkpoint(cfg.run_dir) / "model.safetensors")


def test_half_written_checkpoint_is_ignored(tmp_path):
    cfg = config(tmp_path, 4)
    run = train(cfg, make_task(), Points(), progress=False)
    (run / "checkpoints" / "step_00000008.tmp").mkdir()
    assert latest_checkpoint(run).name == "step_00000004"


def test_resume_with_other_architecture_names_the_key(tmp_path):
    train(config(tmp_path, 4), make_task(), Points(), progress=False)
    other = config(tmp_path, 8)
    other.network = type(other.network)("mlp")
    with pytest.raises(CheckpointError, match="network: checkpoint 'unet' vs config 'mlp'"):
        train(other, make_task(), Points(), resume="auto", progress=False)


def test_batches_shard_across_processes_and_epochs():
    one = list(StepBatchSampler(10, 2, seed=1, start=0, stop=10))
    r0 = list(StepBatchSampler(10, 2, seed=1, start=0, stop=2, rank=0, world_size=2))
    r1 = list(StepBatchSampler(10, 2, seed=1, start=0, stop=2, rank=1, world_size=2))
    assert sorted(sum(one[:5], [])) == list(range(10))       # an epoch covers every item once
    assert r0[0] + r1[0] == one[0] + one[1]                   # ranks split the global batch
    assert list(StepBatchSampler(10, 2, seed=1, start=7, stop=10)) == one[7:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(3, 2, seed=0, start=0, stop=1, world_size=2)


def test_learning_rate_warmup_then_constant_or_cosine():
    from vqdiff.config import LRSchedule, TrainConfig
    from vqdiff.train.loop import learning_rate
    constant = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert learning_rate(constant, 0) == pytest.approx(0.1)
    assert learning_rate(constant, 9) == pytest.approx(1.0)
    assert learning_rate(constant, 100) == 1.0
    cosine = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_schedule=LRSchedule.COSINE)
    assert learning_rate(cosine, 4) == pytest.approx(0.5)  # the warm-up is shared
    assert learning_rate(cosine, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 60) == pytest.approx(0.5)  # half way: cos(pi / 2) = 0
    assert learning_rate(cosine, 85) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert learning_rate(cosine, 110) == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule_rejects_unknown_names():
    from vqdiff.config import ConfigError, ExperimentConfig, from_dict
    with pytest.raises(ConfigError, match="lr_schedule"):
        from_dict(ExperimentConfig, {"train": {"lr_schedule": "linear"}})


@pytest.mark.parametrize("env, cores, expect", [
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}, 4, 4),  # accelerate's default: use the cores
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 4, 2),  # the share
    ({"OMP_NUM_THREADS": "1"}, 4, 1),  # set by the user, not by accelerate: left alone
    ({"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "3"}, 4, 1),  # an explicit count: left alone
])
def test_cpu_threads_after_accelerate_launch(monkeypatch, env, cores, expect):
    from vqdiff.train import loop

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")] + ["OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(loop.os, "cpu_count", lambda: cores)
    chosen = []
    monkeypatch.setattr(loop.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(loop.torch, "set_num_threads", chosen.append)
    loop.use_cpu_share(num_processes=1)
    assert (chosen[-1] if chosen else 1) == expect


def test_resume_rewinds_the_log_to_its_checkpoint(tmp_path):
    """A run killed after logging steps its last checkpoint does not hold (and mid-line): resumed, its log has each
    step once, and the records of the steps run again are those of an uninterrupted run."""
    straight = train(config(tmp_path, 12, "straight"), make_task(), Points(), progress=False)
    split = train(config(tmp_path, 8, "split"), make_task(), Points(), progress=False)
    latest_checkpoint(split).rename(split / "step_8_gone")  # the kill came before step 8's checkpoint
    with open(split / "log.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 0.')
    train(config(tmp_path, 12, "split"), make_task(), Points(), resume="auto", progress=False)

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("steps_per_s", "trained_s")}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records(split)] == [2, 4, 6, 8, 10, 12]
    assert records(split) == records(straight)
