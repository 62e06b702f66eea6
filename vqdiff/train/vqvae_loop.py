"""The accelerate training loop of the Gumbel VQ-VAE tokenizer, and its end product: a trimmed tokenizer directory.

Each step: a Gumbel-softmax pass at the scheduled temperature, the generator loss (reconstruction + KL + the
adaptively weighted GAN term) on the VQ-VAE optimizer, then, once the discriminator is active, the hinge loss on
its own optimizer (taming-transformers' VQLPIPSWithDiscriminator training). The data order, the Gumbel noise
(one generator per step) and the checkpoint layout are the diffusion trainer's, so `resume="auto"` continues
exactly. There is no EMA: `ema.safetensors` holds the trained weights too.

At the end the main process counts how often each code is used over the training data, drops the codes used
fewer than `vqvae.trim_min_count` times, and writes `<run>/tokenizer/` (see vqdiff/io/tokenizer.py).
"""

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, MixedPrecision, save_config
from ..images import make_grid
from ..models.gumbel import TemperatureSchedule, temperature_at
from ..models.vqvae import GumbelVQVAE, batch_images
from ..io.checkpoint import (CheckpointError, architecture_differences, load_into, load_torch, load_weights,
                             read_config, read_state, save_checkpoint)
from ..io.tokenizer import save_tokenizer
from ..io.run_log import rewind_log
from .guard import DivergenceGuard
from .loop import (adamw, checkpoint_to_resume, gradient_norm, learning_rate, make_accelerator, make_loader,
                   step_generator, to_device)
from .run_dir import prepare_run_dir
from .vqvae_losses import VQVAELoss, codebook_counts, codebook_perplexity, psnr

log = logging.getLogger(__name__)

# config keys that must match to resume: the networks' shapes (the discriminator exists iff disc_weight > 0)
ARCHITECTURE_KEYS = ("model", "data.size") + tuple(f"vqvae.{k}" for k in (
    "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embedding_dim", "num_embeddings",
    "norm_groups", "disc_weight"))


def temperature_schedule(cfg: ExperimentConfig) -> TemperatureSchedule:
    t = cfg.vqvae
    return TemperatureSchedule(t.temperature_start, t.temperature_end, t.temperature_steps, t.temperature_decay)


def image_collate(items) -> dict:
    """Batches only the images ({"image": [B, C, H, W]}) of dict items, (image, ...) tuples or bare tensors:
    captions, labels and shapes' objects are not needed."""
    return {"image": torch.stack([batch_images(item, "image") for item in items])}


def image_loader(dataset, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The data set in order, images only."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=image_collate)


@torch.inference_mode()
def reconstruct(model: GumbelVQVAE, images: torch.Tensor) -> torch.Tensor:
    """Encode (argmax codes) and decode: images [B, C, H, W] in [-1, 1] -> reconstructions in [-1, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model.decode(model.encode(images.to(device))).cpu()
    model.train(was_training)
    return out


def reconstruction_psnr(model: GumbelVQVAE, dataset, batch_size: int = 64, progress: bool = False) -> float:
    """Mean per-image PSNR (dB) of the tokenizer's reconstructions over a data set."""
    total, count = 0.0, 0
    for batch in tqdm(image_loader(dataset, batch_size), desc="val PSNR", disable=not progress):
        images = batch["image"]
        total += float(psnr(reconstruct(model, images), images)) * len(images)
        count += len(images)
    return total / count


def freeze_encoder(model: GumbelVQVAE) -> None:
    """Encoder, quant_conv and quantizer in eval mode (argmax codes, no Gumbel noise) without gradients, so
    training steps fit the decoder to the codes that encoding gives."""
    for module in (model.encoder, model.quant_conv, model.quantize):
        module.eval().requires_grad_(False)


def recon_grid(model: GumbelVQVAE, images: torch.Tensor):
    """A PIL picture: the inputs in the first row, their reconstructions below."""
    return make_grid(list(images) + list(reconstruct(model, images)), nrow=len(images))


def train_vqvae(cfg: ExperimentConfig, model: GumbelVQVAE, loss: VQVAELoss, dataset, resume: "str | None" = None,
                progress: bool = True, val_dataset=None, overwrite: bool = False) -> Path:
    """Train the tokenizer until cfg.train.max_steps, then write the trimmed `<run>/tokenizer/`; returns the run
    directory. `resume="auto"` continues from the run's latest intact checkpoint (fresh if none); `overwrite` starts
    over in a directory that holds a run (see run_dir.py); `val_dataset` (optional) supplies the reconstruction
    grids and the final PSNR of the trimmed tokenizer."""
    tc = cfg.train
    run_dir = cfg.run_dir
    # cpu=True without CUDA: several processes then run as gloo MULTI_CPU, as in the diffusion trainer
    accelerator = make_accelerator(tc)
    prepare_run_dir(run_dir, resume, overwrite, accelerator.is_main_process)
    device = accelerator.device
    betas = tuple(tc.adam_betas)
    optimizer = adamw(model.parameters(), tc.lr, betas, tc.weight_decay)
    disc = loss.discriminator
    disc_optimizer = (adamw(disc.parameters(), tc.lr, betas, tc.weight_decay)
                      if disc is not None else None)
    start_step, checkpoint = _resume(run_dir, resume, cfg, model, optimizer, disc, disc_optimizer, accelerator)
    if checkpoint is not None and accelerator.is_main_process:
        rewind_log(run_dir, start_step)
    guard = DivergenceGuard(tc, checkpoint, skip_infinite_grads=tc.mixed_precision is MixedPrecision.FP16)
    guard.start(model.parameters())

    if disc is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loss.discriminator, disc_optimizer = accelerator.prepare(model, optimizer, disc,
                                                                                   disc_optimizer)
    loss.to(device)
    raw_model = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    loader = make_loader(dataset, cfg, start_step, accelerator, image_collate)
    shown = val_dataset if val_dataset is not None else dataset
    preview = image_collate([shown[i] for i in range(min(tc.num_sample_images, len(shown)))])
    schedule = temperature_schedule(cfg)
    stats = _Stats(raw_model.num_embeddings)
    optimizers = [opt for opt in (optimizer, disc_optimizer) if opt is not None]
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc=cfg.name, dynamic_ncols=True)
    step = start_step
    for batch in loader:
        images = to_device(batch, device)["image"]
        generator = step_generator(device, cfg.seed, step, accelerator.process_index)
        lr = learning_rate(tc, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        temperature = temperature_at(step, schedule)
        if step >= tc.max_steps - cfg.vqvae.decoder_finetune_steps:
            freeze_encoder(raw_model)  # every step: reconstruct() puts the modules back into training mode
        out, logs, grad_norm = _generator_step(accelerator, model, raw_model, loss, optimizer, images, temperature,
                                               generator, step, tc, guard)
        if loss.discriminator_active(step):
            logs.update(_discriminator_step(accelerator, loss, disc_optimizer, images, out["recon"], step, tc,
                                            guard))
        step += 1
        stats.add(logs, out["tokens"])
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.max_steps:
            record = stats.flush(accelerator, step, lr, temperature, grad_norm)
            bar.set_postfix(rec=f"{record['rec_loss']:.4g}", psnr=f"{record['psnr']:.2f}")
            _append_log(accelerator, run_dir, record)
        if tc.sample_every > 0 and (step % tc.sample_every == 0 or step == tc.max_steps) \
                and accelerator.is_main_process:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            recon_grid(raw_model, preview["image"]).save(run_dir / "samples" / f"step_{step:08d}.png")
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            guard.check_before_save(raw_model, None, step)
            guard.saved(_save(accelerator, run_dir, step, cfg, raw_model, optimizer, loss, disc_optimizer))
    bar.close()

    if accelerator.is_main_process:
        finish_tokenizer(cfg, raw_model, dataset, val_dataset, progress)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def finish_tokenizer(cfg: ExperimentConfig, model: GumbelVQVAE, dataset, val_dataset=None,
                     progress: bool = True) -> GumbelVQVAE:
    """Count code usage over `dataset`, trim to the codes used at least `vqvae.trim_min_count` times, save
    `<run>/tokenizer/`, and log the kept codes (and the trimmed tokenizer's val PSNR) to log.jsonl."""
    model.eval()
    loader = image_loader(dataset, cfg.data.batch_size, cfg.data.num_workers)
    counts = model.codebook_usage(loader, progress=progress)
    trimmed = model.trim(counts, cfg.vqvae.trim_min_count).eval()
    directory = save_tokenizer(trimmed, cfg.run_dir / "tokenizer")
    record = {"tokenizer": str(directory), "num_kept_codes": trimmed.num_embeddings,
              "codebook_size": trimmed.codebook_size,
              "usage_perplexity": float(codebook_perplexity(counts))}
    if val_dataset is not None:
        record["val_psnr"] = reconstruction_psnr(trimmed, val_dataset, cfg.data.batch_size, progress)
    with open(cfg.run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("tokenizer %s: %d of %d codes kept%s", directory, trimmed.num_embeddings, trimmed.codebook_size,
             f", val PSNR {record['val_psnr']:.2f} dB" if "val_psnr" in record else "")
    return trimmed


def _resume(run_dir: Path, resume, cfg, model, optimizer, disc, disc_optimizer,
            accelerator) -> tuple[int, "Path | None"]:
    """Load the checkpoint to resume from (if any) into the models and optimizers; returns its step and path."""
    checkpoint = checkpoint_to_resume(run_dir, resume)
    if checkpoint is None:
        return 0, None
    diffs = architecture_differences(read_config(checkpoint), cfg, ARCHITECTURE_KEYS)
    if diffs:
        raise CheckpointError(f"checkpoint {checkpoint} was trained with a different config:\n  " + "\n  ".join(diffs))
    load_into(model, load_weights(checkpoint / "model.safetensors"), f"{checkpoint}/model.safetensors")
    optimizers = load_torch(checkpoint / "optimizer.pt")
    optimizer.load_state_dict(optimizers["model"])
    state = read_state(checkpoint)
    if disc is not None:
        load_into(disc, state["discriminator"], f"{checkpoint}/state.pt discriminator")
        disc_optimizer.load_state_dict(optimizers["discriminator"])
    torch.set_rng_state(state["rng_cpu"][accelerator.process_index % len(state["rng_cpu"])])
    log.info("resumed from %s at step %d", checkpoint, state["step"])
    if state["step"] >= cfg.train.max_steps:
        log.warning("the checkpoint is at step %d, train.max_steps is %d: nothing left to train", state["step"],
                    cfg.train.max_steps)
    return state["step"], checkpoint


def _save(accelerator, run_dir, step, cfg, raw_model, optimizer, loss, disc_optimizer) -> "Path | None":
    """Write the checkpoint of `step` (main process); returns its directory there, None on the other processes."""
    accelerator.wait_for_everyone()
    saved = None
    if accelerator.is_main_process:
        weights = raw_model.state_dict()
        state = {"rng_cpu": [torch.get_rng_state()]}
        optimizers = {"model": optimizer.state_dict()}
        if loss.discriminator is not None:
            state["discriminator"] = accelerator.unwrap_model(loss.discriminator).state_dict()
            optimizers["discriminator"] = disc_optimizer.state_dict()
        saved = save_checkpoint(run_dir, step, cfg, weights, weights, optimizers, state,
                                keep=cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return saved


def _generator_step(accelerator, model, raw_model, loss: VQVAELoss, optimizer, images, temperature: float,
                    generator, step: int, tc, guard: DivergenceGuard):
    """One VQ-VAE update; returns (the model's forward dict, the loss logs, the gradient norm before clipping)."""
    with accelerator.autocast():
        out = model(images, temperature=temperature, generator=generator)
        g_loss, logs = loss.generator_loss(out, images, step, last_layer=raw_model.last_layer)
    guard.check_loss(g_loss, step, accelerator.reduce, "generator loss")
    accelerator.backward(g_loss)
    grad_norm = gradient_norm(accelerator, model, tc.grad_clip)
    guard.observe_grad_norm(grad_norm, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, logs, grad_norm


def _discriminator_step(accelerator, loss: VQVAELoss, optimizer, images, recon, step: int, tc,
                        guard: DivergenceGuard) -> dict:
    with accelerator.autocast():
        d_loss, logs = loss.discriminator_loss(images, recon.detach(), step)
    guard.check_loss(d_loss, step, accelerator.reduce, "discriminator loss")
    optimizer.zero_grad(set_to_none=True)  # the generator step left gradients in the discriminator
    accelerator.backward(d_loss)
    if tc.grad_clip > 0:
        accelerator.clip_grad_norm_(loss.discriminator.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logs


def _append_log(accelerator, run_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class _Stats:
    """Running means of the loss logs between log lines, and the codes used in that window."""

    def __init__(self, num_codes: int):
        self.num_codes = num_codes
        self.reset()

    def reset(self):
        self.sums: dict[str, float] = {}
        self.terms: dict[str, int] = {}  # steps that logged each name (the GAN terms start late)
        self.counts = torch.zeros(self.num_codes, dtype=torch.long)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, logs: dict, tokens: torch.Tensor):
        self.steps += 1
        for name, value in logs.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.terms[name] = self.terms.get(name, 0) + 1
        self.counts += codebook_counts(tokens.detach(), self.num_codes).cpu()

    def flush(self, accelerator, step: int, lr: float, temperature: float, grad_norm) -> dict:
        counts = accelerator.reduce(self.counts.to(accelerator.device), reduction="sum").cpu()
        record = {"step": step, "lr": lr, "temperature": temperature,
                  "steps_per_s": self.steps / max(time.perf_counter() - self.started, 1e-9)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record.update({name: total / self.terms[name] for name, total in self.sums.items()})
        # usage: the fraction of codes chosen at least once in this window
        record.update(perplexity=float(codebook_perplexity(counts)), usage=float((counts > 0).float().mean()))
        self.reset()
        return record
