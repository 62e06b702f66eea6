"""`kill -9` in the middle of a run (possibly during a checkpoint write): the checkpoints on disk stay intact and
`--resume auto` ends with exactly the weights, EMA, optimizer and time-sampler state of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from vqdiff.io.manifest import directory_problems
from vqdiff.io.checkpoint import latest_checkpoint, list_checkpoints, load_torch, load_weights

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100


def train_command(run_dir, *extra):
    return [sys.executable, "-m", "vqdiff.cli", "train", "--config", "configs/ddpm_scurve.yaml", "--no-progress",
            f"out_dir={run_dir}", f"train.max_steps={STEPS}", "train.checkpoint_every=10", "train.keep_checkpoints=3",
            "train.sample_every=0", "gaussian.num_timesteps=50", "data.num_samples=640", "data.batch_size=64",
            "gaussian.time_sampler=importance", *extra]


def run(args):
    # one thread, as the straight run: the same reduction order gives bit-identical results
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = run(train_command(tmp_path / "straight"))
    victim = run(train_command(tmp_path / "killed"))
    deadline = time.monotonic() + 300
    while len(list_checkpoints(tmp_path / "killed")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    for checkpoint in list_checkpoints(tmp_path / "killed"):
        assert directory_problems(checkpoint) == []
    resumed = run(train_command(tmp_path / "killed", "--resume", "auto"))
    for process in (straight, resumed):
        assert process.wait(timeout=900) == 0, process.stderr.read()
    a, b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "killed")
    assert a.name == b.name == f"step_{STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = load_torch(a / "optimizer.pt")["state"], load_torch(b / "optimizer.pt")["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    sa, sb = load_torch(a / "state.pt")["time_sampler"], load_torch(b / "state.pt")["time_sampler"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
