"""Training tasks: for each model type, what the trainer needs (network, per-sample losses, time sampler,
preview pictures, evaluations), built from a config through build.py.

    cfg = prepare_config(cfg)              # measures gaussian.latent_scale when a latent DDPM leaves it unset
    run_dir = train(cfg, build_task(cfg), build_train_dataset(cfg))
"""

import dataclasses
import logging

import torch

from ..build import (VECTOR_DATA, build_model_and_diffusion, build_time_sampler, build_train_dataset,
                     load_configured_tokenizer, token_grid)
from ..config import ConfigError, DiffusionSpace, ExperimentConfig, ModelType, Network
from ..pipeline import GaussianTextToImagePipeline, TextToImagePipeline
from .loop import TrainTask, default_collate
from .previews import ddpm_preview, shapes_evaluator, text_preview
from .vqvae_losses import VQVAELoss

log = logging.getLogger(__name__)

# config sections that must match a checkpoint to resume or initialise from it
DDPM_ARCHITECTURE = {Network.UNET: ("unet", "gaussian", "data.size"), Network.MLP: ("mlp", "gaussian")}
TEXT_DDPM_ARCHITECTURE = ("unet", "gaussian", "text", "data.size", "tokenizer.path")
VQ_ARCHITECTURE = ("transformer", "text", "discrete.num_timesteps", "tokenizer.path", "data.size")


def seed_everything(seed: int) -> None:
    """Entry points only (never library code): makes weight init reproducible."""
    torch.manual_seed(seed)


def build_task(cfg: ExperimentConfig) -> TrainTask:
    if cfg.model is ModelType.DDPM:
        if cfg.unet.text or cfg.gaussian.space is DiffusionSpace.LATENT:
            return build_text_ddpm_task(cfg)
        return build_ddpm_task(cfg)
    if cfg.model is ModelType.VQ_DIFFUSION:
        return build_vq_task(cfg)
    raise ConfigError(f"model: {cfg.model.value!r} is trained by scripts/train_vqvae.py, not this trainer")


def build_vqvae_loss(cfg: ExperimentConfig) -> VQVAELoss:
    t = cfg.vqvae
    return VQVAELoss(recon=t.recon, codebook_weight=t.codebook_weight, disc_weight=t.disc_weight,
                     disc_start=t.disc_start, perceptual_weight=t.perceptual_weight,
                     perceptual_path=t.perceptual_path)


# ---- Gaussian DDPM ---------------------------------------------------------------------------------

def ddpm_cond(cfg: ExperimentConfig, batch: dict) -> dict:
    """Network keyword arguments from a batch: class labels for class-conditional UNets."""
    if cfg.network is Network.UNET and cfg.unet.num_classes is not None:
        return {"y": batch["label"]}
    return {}


def build_ddpm_task(cfg: ExperimentConfig) -> TrainTask:
    """An unconditional (or class-conditional) DDPM on images or 2-D points."""
    model, diffusion = build_model_and_diffusion(cfg)
    data_key = "x" if cfg.data.name in VECTOR_DATA else "image"

    def losses(model, batch, t, generator):
        return diffusion.training_losses(model, batch[data_key], t, generator=generator, **ddpm_cond(cfg, batch))

    return TrainTask(model=model, losses=losses,
                     time_sampler=build_time_sampler(cfg.gaussian.time_sampler, diffusion.num_timesteps),
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: ddpm_preview(cfg, diffusion, ema_model, generator),
                     architecture_sections=DDPM_ARCHITECTURE[cfg.network])


@torch.no_grad()
def ddpm_latents(tokenizer, batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """Unscaled latents [B, D, h, w] of a batch: embedded cached tokens, else the encoded images."""
    if "tokens" in batch:
        return tokenizer.embed_tokens(batch["tokens"].long().reshape(-1, *grid))
    return tokenizer.encode_latents(batch["image"])


def measure_latent_scale(tokenizer, dataset, grid: tuple[int, int], count: int = 64) -> float:
    """1 / std of the first `count` items' latents (Rombach et al. 2022, Sec. 4.3.2), to 4 significant digits
    so that a resumed run measures the same value on any device."""
    batch = default_collate([dataset[i] for i in range(min(count, len(dataset)))])
    return float(f"{1.0 / ddpm_latents(tokenizer, batch, grid).std().item():.4g}")


def prepare_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as the run saves it: a latent DDPM's unset gaussian.latent_scale measured on the training data
    (a copy; `cfg` itself is left as it is)."""
    latent = cfg.model is ModelType.DDPM and cfg.gaussian.space is DiffusionSpace.LATENT
    if not latent or cfg.gaussian.latent_scale is not None:
        return cfg
    tokenizer = load_configured_tokenizer(cfg).eval().requires_grad_(False)
    scale = measure_latent_scale(tokenizer, build_train_dataset(cfg), token_grid(cfg, tokenizer))
    log.info("latent scale (1 / std of the latents): %g", scale)
    return dataclasses.replace(cfg, gaussian=dataclasses.replace(cfg.gaussian, latent_scale=scale))


def build_text_ddpm_task(cfg: ExperimentConfig) -> TrainTask:
    """Captions -> text encoder -> cross-attention UNet, diffusing pixels or the tokenizer's scaled latents."""
    if not cfg.unet.text or cfg.network is not Network.UNET:
        raise ConfigError("gaussian.space=latent is text-to-image here: it needs network: unet and unet.text: true")
    tokenizer = None
    if cfg.gaussian.space is DiffusionSpace.LATENT:
        if cfg.gaussian.latent_scale is None:
            raise ConfigError("gaussian.latent_scale: unset; train.tasks.prepare_config(cfg) measures it")
        tokenizer = load_configured_tokenizer(cfg).eval().requires_grad_(False)
        grid = token_grid(cfg, tokenizer)
    model, diffusion = build_model_and_diffusion(cfg, tokenizer)

    def losses(model, batch, t, generator):
        if tokenizer is None:
            x0 = batch["image"]
        else:
            tokenizer.to(t.device)
            x0 = ddpm_latents(tokenizer, batch, grid) * cfg.gaussian.latent_scale
        return diffusion.training_losses(model, x0, t, generator=generator, captions=batch["caption"])

    def pipeline(ema_model):
        return GaussianTextToImagePipeline(cfg, ema_model, diffusion, tokenizer)

    return TrainTask(model=model, losses=losses,
                     time_sampler=build_time_sampler(cfg.gaussian.time_sampler, diffusion.num_timesteps),
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: text_preview(pipeline(ema_model), generator),
                     architecture_sections=TEXT_DDPM_ARCHITECTURE, evaluate=shapes_evaluator(cfg, pipeline))


# ---- VQ-Diffusion ----------------------------------------------------------------------------------

def build_vq_task(cfg: ExperimentConfig) -> TrainTask:
    tokenizer = load_configured_tokenizer(cfg).eval().requires_grad_(False)
    model, diffusion = build_model_and_diffusion(cfg, tokenizer)

    def losses(model, batch, t, generator):
        if "tokens" in batch:
            x0 = batch["tokens"]
        else:
            tokenizer.to(batch["image"].device)
            with torch.no_grad():
                x0 = tokenizer.encode(batch["image"]).flatten(1)  # [B, N]
        return diffusion.training_losses(model, x0, t, generator=generator, captions=batch["caption"])

    def pipeline(ema_model):
        return TextToImagePipeline(cfg, ema_model, diffusion, tokenizer)

    # VQ-Diffusion's importance sampler: p(t) ~ sqrt of the moving average of L_t^2, updated with losses["kl"]
    time_sampler = build_time_sampler(cfg.discrete.time_sampler, diffusion.num_timesteps, ema_decay=0.9)
    return TrainTask(model=model, losses=losses, time_sampler=time_sampler,
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: text_preview(pipeline(ema_model), generator),
                     architecture_sections=VQ_ARCHITECTURE, sampler_term="kl",
                     evaluate=shapes_evaluator(cfg, pipeline))
