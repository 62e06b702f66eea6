"""Prompts -> images with a text-conditional Gaussian DDPM, on pixels or on the tokenizer's latents.

The Gaussian counterpart of `pipeline.TextToImagePipeline` (configs with `model: ddpm` and `unet.text: true`),
with the same calls: `pipe(prompts, generator, steps=..., guidance_scale=...)`, `sample_iter`, `decode`,
`save_pretrained` / `from_pretrained`; `pipeline.load_pipeline` picks the class from the saved config.
"""

from pathlib import Path

import torch
from PIL import Image

from . import build
from .config import ConfigError, DiffusionSpace
from .images import to_pil
from .io.checkpoint import CheckpointError, load_into, load_weights, read_config, resolve_checkpoint
from .io.pipeline_folder import (TEXT_ENCODER_FILE, TOKENIZER_DIR, find_pipeline_folder, load_parts,
                                 check_complete, write_pipeline_folder)
from .io.tokenizer import load_tokenizer

PIPELINE_FILES = ("config.yaml", "unet.safetensors", "text_encoder.safetensors")
VQ_ONLY_OPTIONS = ("truncation_rate", "temperature", "strategy")


class GaussianTextToImagePipeline:
    """Holds the text encoder + cross-attention UNet (`model`, a TextConditioned), the Gaussian diffusion and, for
    latent diffusion, the tokenizer whose decoder turns latents / gaussian.latent_scale into images."""

    def __init__(self, cfg, model, diffusion, tokenizer=None):
        self.cfg, self.model, self.diffusion = cfg, model.eval(), diffusion
        self.latent = cfg.gaussian.space is DiffusionSpace.LATENT
        if self.latent and (tokenizer is None or cfg.gaussian.latent_scale is None):
            raise CheckpointError("a latent DDPM needs its tokenizer and gaussian.latent_scale")
        self.tokenizer = tokenizer.eval() if tokenizer is not None else None
        self.shape = build.data_shape(cfg, tokenizer)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device) -> "GaussianTextToImagePipeline":
        self.model.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        return self

    def compile(self, mode: str | None = None) -> "GaussianTextToImagePipeline":
        """torch.compile the UNet's forward (see TextToImagePipeline.compile)."""
        network = self.model.network
        network.forward = torch.compile(network.forward, mode=mode)
        return self

    # ---- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "GaussianTextToImagePipeline":
        """A directory written by save_pretrained, or a training run / checkpoint (its EMA weights)."""
        folder = find_pipeline_folder(path, "unet.safetensors")
        if folder is not None:
            return cls._from_pipeline_dir(folder).to(device)
        checkpoint = resolve_checkpoint(path)
        cfg = read_config(checkpoint)
        if not build.is_text_ddpm(cfg):
            raise CheckpointError(f"{checkpoint} holds no text-conditional Gaussian model (model: ddpm, unet.text)")
        tokenizer = build.load_configured_tokenizer(cfg) if cfg.gaussian.space is DiffusionSpace.LATENT else None
        model, diffusion = build.build_model_and_diffusion(cfg, tokenizer)
        load_into(model, load_weights(checkpoint / "ema.safetensors"), f"{checkpoint}/ema.safetensors")
        return cls(cfg, model, diffusion, tokenizer).to(device)

    @classmethod
    def _from_pipeline_dir(cls, path: Path) -> "GaussianTextToImagePipeline":
        cfg = read_config(path)
        latent = cfg.gaussian.space is DiffusionSpace.LATENT
        check_complete(path, PIPELINE_FILES + ((TOKENIZER_DIR,) if latent else ()))
        tokenizer = load_tokenizer(path / TOKENIZER_DIR) if latent else None
        model, diffusion = build.build_model_and_diffusion(cfg, tokenizer)
        load_parts(path, {"unet.safetensors": model.network, TEXT_ENCODER_FILE: model.text_encoder})
        return cls(cfg, model, diffusion, tokenizer)

    def save_pretrained(self, path) -> Path:
        """config.yaml, unet.safetensors, text_encoder.safetensors and, for latents, tokenizer/ (atomically)."""
        return write_pipeline_folder(path, self.cfg, {"unet.safetensors": self.model.network,
                                                      TEXT_ENCODER_FILE: self.model.text_encoder},
                                     self.tokenizer if self.latent else None)

    # ---- sampling --------------------------------------------------------------------------------

    def sampling_options(self, **given) -> dict:
        """steps (int, "50", "ddim25"...), sampler (ddpm | ddim), eta, guidance_scale; defaults from cfg.sample."""
        wrong = [k for k in VQ_ONLY_OPTIONS if given.get(k) is not None]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: VQ-Diffusion options; a Gaussian model takes steps, sampler, "
                              "eta and guidance_scale")
        s = self.cfg.sample
        defaults = dict(steps=s.steps, sampler=s.sampler, eta=s.eta, guidance_scale=s.guidance_scale)
        return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}

    def conditions(self, prompts: list[str], guidance_scale: float) -> tuple[dict, dict | None]:
        """UNet inputs for the prompts and, when guiding, for the learned null caption."""
        network = self.model.network
        text, mask = self.model.encode_text(prompts)
        cond = {"text": text, "text_mask": mask}
        if guidance_scale == 1.0:
            return cond, None
        null_text, null_mask = network.null_text(len(prompts))
        return cond, {"text": null_text, "text_mask": null_mask}

    @torch.no_grad()
    def sample_iter(self, prompts, generator=None, progress: bool = True, **options):
        """Yield the state [B, C, H, W] (pixels, or scaled latents) after each reverse step."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        opts = self.sampling_options(**options)
        cond, null_cond = self.conditions(prompts, opts["guidance_scale"])
        for state in self.diffusion.sample_iter(
                self.model.network, (len(prompts), *self.shape), cond=cond, null_cond=null_cond,
                clip_denoised=self.cfg.sample.clip_denoised and not self.latent, generator=generator,
                progress=progress, device=self.device, **opts):
            yield state["sample"]

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        """States [B, C, H, W] -> PIL images (latents through the tokenizer's decoder)."""
        if self.latent:
            z = x / self.cfg.gaussian.latent_scale
            if self.cfg.sample.quantize_latents:
                z = self.tokenizer.embed_tokens(self.tokenizer.nearest_tokens(z))
            x = self.tokenizer.decode_latents(z)
        return [to_pil(image) for image in x.clamp(-1, 1)]

    decode_partial = decode  # intermediate states decode like final ones (the CLI's progress GIF)

    @torch.no_grad()
    def __call__(self, prompts, generator=None, progress: bool = True, **options) -> list[Image.Image]:
        """One image per prompt. Options: steps, sampler, eta, guidance_scale."""
        x = None
        for x in self.sample_iter(prompts, generator, progress, **options):
            pass
        return self.decode(x)
