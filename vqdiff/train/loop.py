"""The one accelerate training loop used by every diffusion model in the repo.

A `TrainTask` (built by vqdiff.build) says what to train and how to score a batch; this loop owns
the rest: data order, time sampling with importance weights, AdamW with warmup, grad clipping, EMA,
mixed precision, logging, sample grids, atomic checkpoints and exact resumption.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, ExperimentConfig, LRSchedule, MixedPrecision, TrainConfig, save_config
from ..io.checkpoint import (CheckpointError, architecture_differences, latest_intact_checkpoint, load_into,
                             load_torch, load_weights, read_config, read_state, resolve_checkpoint, save_checkpoint)
from ..io.run_log import rewind_log
from .ema import EMA
from .guard import DivergenceGuard, TrainingDiverged  # noqa: F401 -- TrainingDiverged: callers catch it from here
from .run_dir import prepare_run_dir

log = logging.getLogger(__name__)


@dataclass
class TrainTask:
    model: nn.Module
    # (model, batch, t, generator) -> {"loss": [B], other per-sample terms}
    losses: Callable[[nn.Module, dict, torch.Tensor, torch.Generator], dict]
    time_sampler: object
    num_timesteps: int
    # (ema model, generator) -> PIL image of a sample grid, or None when the task has no pictures
    make_samples: Callable | None = None
    # config sections that must match for --resume / --init-from
    architecture_sections: tuple[str, ...] = ()
    # the per-sample term whose second moment drives importance sampling (VQ-Diffusion: the VLB term "kl")
    sampler_term: str = "loss"
    # (ema model, generator) -> {metric: value}, run every train.eval_every steps and logged as {"eval": ...}
    evaluate: Callable | None = None


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch indices for steps [start, stop): a fresh permutation per epoch seeded by (seed, epoch), each
    process taking its own slice, so batch k is the same whether or not training was resumed before k.
    `with_epoch` yields (epoch, index) pairs, for data sets that draw one of several captions per epoch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1, with_epoch: bool = False):
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise ConfigError(f"the data set has {num_items} items, fewer than one global batch "
                             f"({batch_size} x {world_size} processes)")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.stop, self.rank, self.with_epoch = start, stop, rank, with_epoch
        self.per_epoch = num_items // self.global_batch

    def __len__(self):
        return max(self.stop - self.start, 0)

    def __iter__(self):
        epoch, perm = None, None
        for step in range(self.start, self.stop):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + e))
            begin = k * self.global_batch + self.rank * self.batch_size
            indices = perm[begin:begin + self.batch_size].tolist()
            yield [(e, i) for i in indices] if self.with_epoch else indices


def default_collate(items: list[dict]) -> dict:
    """Stack tensors and numbers per key; anything else (captions, object lists) stays a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, (torch.Tensor, int, float)) for v in values):
            batch[key] = torch.utils.data.default_collate(values)
        else:
            batch[key] = values
    return batch


def make_loader(dataset, cfg: ExperimentConfig, start_step: int, accelerator, collate_fn=None):
    """Batches for steps [start_step, max_steps), each process its own share (see StepBatchSampler)."""
    sampler = StepBatchSampler(len(dataset), cfg.data.batch_size, cfg.seed, start_step, cfg.train.max_steps,
                               accelerator.process_index, accelerator.num_processes,
                               with_epoch=hasattr(dataset, "set_epoch"))
    # its own generator: the loader must not draw from the global RNG, or resuming would shift dropout noise
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       collate_fn=collate_fn or getattr(dataset, "collate", default_collate),
                                       generator=torch.Generator().manual_seed(cfg.seed))


def learning_rate(tc: TrainConfig, step: int) -> float:
    """train.lr after a linear warm-up over train.warmup_steps, constant or cosine-decayed to 0 at max_steps."""
    warmup = min(1.0, (step + 1) / max(tc.warmup_steps, 1))
    if tc.lr_schedule is LRSchedule.CONSTANT or step < tc.warmup_steps:
        return tc.lr * warmup
    progress = min(1.0, (step - tc.warmup_steps) / max(tc.max_steps - tc.warmup_steps, 1))
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(device, seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


def adamw(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters): on 2 CPU cores it takes 13 ms a step where
    the per-parameter loop takes 65 ms, for configs/shapes.yaml's 22M parameters (scripts/bench_train.py)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def make_accelerator(tc: TrainConfig, **kwargs) -> Accelerator:
    """The run's Accelerator; on a machine without CUDA several processes run as gloo MULTI_CPU. A process that
    trains again with another mixed precision (one Python session, two configs) gets a fresh accelerator state:
    accelerate keeps one per process and refuses a second setting."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", tc.mixed_precision.value) != tc.mixed_precision.value:
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=tc.mixed_precision.value, cpu=not torch.cuda.is_available(), **kwargs)
    if accelerator.device.type == "cpu":
        use_cpu_share(accelerator.num_processes)
    return accelerator


def use_cpu_share(num_processes: int) -> None:
    """`accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core run: give each
    local process its share of the cores instead (a thread count set any other way is left alone)."""
    launched_by_accelerate = any(key.startswith("ACCELERATE_") for key in os.environ)
    share = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", num_processes)))
    if launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1" and share > torch.get_num_threads():
        log.info("accelerate launch set OMP_NUM_THREADS=1; using %d threads per process (the CPU's share)", share)
        torch.set_num_threads(share)


def _say_if_text_is_random(cfg: ExperimentConfig, model: nn.Module) -> None:
    """A fresh run whose text encoder starts from random weights (text.weights: none). Said here rather than when
    the encoder is built, since loading a trained model builds it that way too before its weights arrive."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is None or str(cfg.text.weights).lower() != "none":
        return
    if encoder.trainable:
        log.info("the text encoder %s starts from random weights (text.weights: none) and is trained jointly",
                 cfg.text.arch)
    else:
        log.warning("the text encoder %s is random (text.weights: none) and frozen, so its features stay random: "
                    "set text.weights to a local CLIP file or text.trainable: true", cfg.text.arch)


def train(cfg: ExperimentConfig, task: TrainTask, dataset, resume: "str | None" = None,
          init_from: "str | None" = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Train until cfg.train.max_steps; returns the run directory. `resume="auto"` continues from the
    latest intact checkpoint of the run (or starts fresh if there is none); `init_from` loads weights only. A run
    directory that holds checkpoints needs `resume` or `overwrite` (see run_dir.py)."""
    tc = cfg.train
    run_dir = cfg.run_dir
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = make_accelerator(tc, kwargs_handlers=[ddp])
    prepare_run_dir(run_dir, resume, overwrite, accelerator.is_main_process)
    device = accelerator.device
    model = task.model
    optimizer = adamw(model.parameters(), tc.lr, tuple(tc.adam_betas), tc.weight_decay)
    ema = EMA(model, tc.ema_decay, tc.ema_every, tc.ema_start)
    start_step, trained_s = 0, 0.0  # trained_s: wall time of training steps, without previews and evaluations

    checkpoint = checkpoint_to_resume(run_dir, resume)
    if checkpoint is not None:
        _check_same_architecture(checkpoint, cfg, task)
        load_into(model, load_weights(checkpoint / "model.safetensors"), f"{checkpoint}/model.safetensors")
        load_into(ema.model, load_weights(checkpoint / "ema.safetensors"), f"{checkpoint}/ema.safetensors")
        optimizer.load_state_dict(load_torch(checkpoint / "optimizer.pt"))
        state = read_state(checkpoint)
        task.time_sampler.load_state_dict(state["time_sampler"])
        torch.set_rng_state(state["rng_cpu"][accelerator.process_index % len(state["rng_cpu"])])
        start_step = state["step"]
        trained_s = state.get("trained_s", 0.0)
        log.info("resumed from %s at step %d", checkpoint, start_step)
        if accelerator.is_main_process:
            rewind_log(run_dir, start_step)
        if start_step >= tc.max_steps:
            log.warning("the checkpoint is at step %d, train.max_steps is %d: nothing left to train", start_step,
                        tc.max_steps)
    elif init_from is not None:
        source = resolve_checkpoint(init_from)
        _check_same_architecture(source, cfg, task)
        weights = load_weights(source / "ema.safetensors")
        load_into(model, weights, f"{source}/ema.safetensors")
        load_into(ema.model, weights, f"{source}/ema.safetensors")
        log.info("initialised weights from %s (fresh optimizer)", source)
    else:
        _say_if_text_is_random(cfg, model)

    guard = DivergenceGuard(tc, checkpoint, skip_infinite_grads=tc.mixed_precision is MixedPrecision.FP16)
    guard.start(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(device)
    raw_model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    loader = make_loader(dataset, cfg, start_step, accelerator)
    stats = _Stats(task.num_timesteps)
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc=cfg.name, dynamic_ncols=True)
    step = start_step
    step_started = time.perf_counter()
    for batch in loader:
        batch = to_device(batch, device)
        generator = step_generator(device, cfg.seed, step, accelerator.process_index)
        batch_size = _batch_size(batch)
        t, weights = task.time_sampler.sample(batch_size, device, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(tc, step)
        with accelerator.autocast():
            terms = task.losses(model, batch, t, generator)
        per_sample = terms["loss"].float()
        loss = (per_sample * weights).mean()
        guard.check_loss(loss, step, accelerator.reduce)
        accelerator.backward(loss)
        grad_norm = gradient_norm(accelerator, model, tc.grad_clip)
        guard.observe_grad_norm(grad_norm, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.time_sampler.update(t, terms[task.sampler_term].detach().float())
        step += 1
        ema.update(raw_model, step)
        stats.add(t, per_sample.detach(), terms)
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.max_steps:
            record = stats.flush(step, optimizer.param_groups[0]["lr"], grad_norm)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if accelerator.is_main_process:
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        trained_s += time.perf_counter() - step_started
        if task.make_samples is not None and tc.sample_every > 0 and (
                step % tc.sample_every == 0 or step == tc.max_steps) and accelerator.is_main_process:
            _save_samples(task, ema.model, run_dir, step, cfg.seed, device)
        if task.evaluate is not None and tc.eval_every > 0 and (
                step % tc.eval_every == 0 or step == tc.max_steps) and accelerator.is_main_process:
            _log_evaluation(task, ema.model, run_dir, step, trained_s, cfg.seed, device)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            guard.check_before_save(raw_model, ema.model, step)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                rng = [torch.get_rng_state()]
                guard.saved(save_checkpoint(run_dir, step, cfg, raw_model.state_dict(), ema.state_dict(),
                                            optimizer.state_dict(), {"time_sampler": task.time_sampler.state_dict(),
                                                                     "rng_cpu": rng, "trained_s": trained_s},
                                            keep=tc.keep_checkpoints))
            accelerator.wait_for_everyone()
        step_started = time.perf_counter()
    bar.close()
    if accelerator.num_processes > 1:
        _check_replicas_agree(raw_model, accelerator)
    accelerator.end_training()
    return run_dir


def gradient_norm(accelerator, model: nn.Module, grad_clip: float) -> torch.Tensor:
    """The total gradient norm before clipping, clipped to `grad_clip` when that is > 0."""
    if grad_clip > 0:
        return accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


@torch.no_grad()
def _check_replicas_agree(model: nn.Module, accelerator) -> None:
    """Every process must end with the same weights (DDP keeps them in step; this proves it)."""
    checksum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    for i, p in enumerate(model.parameters()):
        checksum += (i + 1) * p.double().sum()
    gathered = accelerator.gather(checksum)
    if not torch.all(gathered == gathered[0]):
        raise RuntimeError(f"the {accelerator.num_processes} training processes ended with different weights "
                           f"(checksums {gathered.tolist()})")
    log.info("%d replicas agree (parameter checksum %.10g)", accelerator.num_processes, float(gathered[0]))


def checkpoint_to_resume(run_dir: Path, resume: "str | None") -> "Path | None":
    if resume is None:
        return None
    if resume == "auto":
        found = latest_intact_checkpoint(run_dir)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", run_dir)
        return found
    return resolve_checkpoint(resume)


def _check_same_architecture(checkpoint: Path, cfg: ExperimentConfig, task: TrainTask) -> None:
    saved = read_config(checkpoint)
    diffs = architecture_differences(saved, cfg, ("model", "network") + task.architecture_sections)
    if diffs:
        raise CheckpointError(f"checkpoint {checkpoint} was trained with a different config:\n  "
                              + "\n  ".join(diffs))


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError("cannot tell the batch size: the batch holds no tensor or list")


def _save_samples(task: TrainTask, ema_model, run_dir: Path, step: int, seed: int, device) -> None:
    image = task.make_samples(ema_model, torch.Generator(device=device).manual_seed(seed))
    out = run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / f"step_{step:08d}.png")


def _log_evaluation(task: TrainTask, ema_model, run_dir: Path, step: int, trained_s: float, seed: int,
                    device) -> None:
    metrics = task.evaluate(ema_model, torch.Generator(device=device).manual_seed(seed))
    log.info("step %d evaluation: %s", step, metrics)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "trained_s": trained_s, "eval": metrics}) + "\n")


class _Stats:
    """Running means between log lines: total loss, named terms, and loss per quartile of t."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.reset()

    def reset(self):
        self.sums, self.counts = {}, {}
        self.started = time.perf_counter()
        self.steps = 0

    def _add(self, name, values):
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def add(self, t, per_sample, terms):
        self.steps += 1
        self._add("loss", per_sample)
        for name, value in terms.items():
            if name != "loss" and isinstance(value, torch.Tensor) and value.ndim == 1:
                self._add(name, value.detach().float())
        quartile = (t * 4) // self.num_timesteps
        for q in range(4):
            chosen = per_sample[quartile == q]
            if chosen.numel():
                self._add(f"loss_q{q}", chosen)

    def flush(self, step, lr, grad_norm) -> dict:
        elapsed = time.perf_counter() - self.started
        record = {"step": step, "lr": lr, "steps_per_s": self.steps / max(elapsed, 1e-9)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update({k: self.sums[k] / self.counts[k] for k in self.sums})
        if not math.isfinite(record.get("loss", 0.0)):
            record["loss"] = float("nan")
        self.reset()
        return record
