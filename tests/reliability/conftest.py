"""Tiny runs for the reliability tests: a 2-D regression task that trains in well under a second a step, and
helpers that read what a run left on disk."""

import hashlib

import pytest
import torch
from torch import nn

from vqdiff.config import load_config
from vqdiff.diffusion.timestep_sampler import ImportanceSampler
from vqdiff.train.loop import TrainTask, train

T = 8


class Points(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i]}


def make_task(scale_from=None, scale=1.0):
    """A denoising regression; from loss call `scale_from` on, the loss is multiplied by `scale` (finite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    calls = {"n": 0}

    def losses(model, batch, t, generator):
        calls["n"] += 1
        x = batch["x"]
        noise = torch.randn(x.shape, generator=generator)
        loss = ((model(torch.cat([x + noise, t[:, None].float() / T], dim=1)) - x) ** 2).mean(dim=1)
        if scale_from is not None and calls["n"] > scale_from:
            loss = loss * scale
        return {"loss": loss}

    return TrainTask(model=model, losses=losses, time_sampler=ImportanceSampler(T, history=2), num_timesteps=T)


def tiny_config(tmp_path, steps, name="run", *extra):
    return load_config(None, [f"name={name}", f"out_dir={tmp_path / name}", f"train.max_steps={steps}",
                              "train.checkpoint_every=4", "train.log_every=2", "train.lr=0.01",
                              "train.ema_decay=0.9", "data.batch_size=8", "train.keep_checkpoints=5", *extra])


def tiny_run(tmp_path, steps, name="run", *extra, task=None, **kwargs):
    cfg = tiny_config(tmp_path, steps, name, *extra)
    return train(cfg, task or make_task(), Points(), progress=False, **kwargs)


def digests(directory):
    """{relative path: sha256} of every file under `directory`."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny(tmp_path):
    """The helpers above, bound to the test's tmp_path: tiny.run(steps, name, *overrides, task=..., resume=...)."""
    class Tiny:
        task = staticmethod(make_task)
        digests = staticmethod(digests)

        @staticmethod
        def config(steps, name="run", *extra):
            return tiny_config(tmp_path, steps, name, *extra)

        @staticmethod
        def run(steps, name="run", *extra, task=None, **kwargs):
            return tiny_run(tmp_path, steps, name, *extra, task=task, **kwargs)

    return Tiny
