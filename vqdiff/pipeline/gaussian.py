"""Gaussian DDPM pipelines: prompts -> images on pixels or on the tokenizer's latents
(`GaussianTextToImagePipeline`, configs with `model: ddpm` and `unet.text: true`), and unconditional or
class-conditional samples of images or 2-D points (`DDPMPipeline`)."""

from pathlib import Path

import torch
from PIL import Image

from ..build import IMAGE_DATA, build_dataset, data_shape, is_text_ddpm
from ..config import DiffusionSpace, ExperimentConfig, ModelType
from ..images import make_grid, scatter, to_pil
from ..io.checkpoint import CheckpointError
from .base import Pipeline, TextPipeline


class GaussianTextToImagePipeline(TextPipeline):
    """Holds the text encoder + cross-attention UNet (`model`, a TextConditioned), the Gaussian diffusion and, for
    latent diffusion, the tokenizer whose decoder turns latents / gaussian.latent_scale into images."""

    NETWORK_FILE = "unet.safetensors"
    OPTIONS = ("steps", "sampler", "eta", "guidance_scale")

    def __init__(self, cfg: ExperimentConfig, model, diffusion, tokenizer=None):
        super().__init__(cfg, model, diffusion, tokenizer)
        self.latent = cfg.gaussian.space is DiffusionSpace.LATENT
        if self.latent and (tokenizer is None or cfg.gaussian.latent_scale is None):
            raise CheckpointError("a latent DDPM needs its tokenizer and gaussian.latent_scale")
        self.shape = data_shape(cfg, tokenizer)

    @classmethod
    def check_config(cls, cfg: ExperimentConfig, where: Path) -> None:
        if not is_text_ddpm(cfg):
            raise CheckpointError(f"{where} holds no text-conditional Gaussian model (model: ddpm, unet.text)")

    def conditions(self, prompts: list[str], guidance_scale: float) -> tuple[dict, dict | None]:
        """UNet inputs for the prompts and, when guiding, for the learned null caption."""
        text, mask = self.model.encode_text(prompts)
        cond = {"text": text, "text_mask": mask}
        if guidance_scale == 1.0:
            return cond, None
        null_text, null_mask = self.network.null_text(len(prompts))
        return cond, {"text": null_text, "text_mask": null_mask}

    @torch.no_grad()
    def sample_iter(self, prompts, generator=None, progress: bool = True, **options):
        """Yield the state [B, C, H, W] (pixels, or scaled latents) after each reverse step."""
        for state in self.sample_states(prompts, generator, progress, **options):
            yield state["sample"]

    @torch.no_grad()
    def sample_states(self, prompts, generator=None, progress: bool = True, **options):
        """Yield the diffusion's {"sample", "pred_xstart", "t"} after each reverse step (eval.trace reads the
        predicted x0)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        opts = self.sampling_options(**options)
        cond, null_cond = self.conditions(prompts, opts["guidance_scale"])
        yield from self.diffusion.sample_iter(
            self.network, (len(prompts), *self.shape), cond=cond, null_cond=null_cond,
            clip_denoised=self.cfg.sample.clip_denoised and not self.latent, generator=generator,
            progress=progress, device=self.device, **opts)

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


class DDPMPipeline(Pipeline):
    """A trained unconditional (or class-conditional) Gaussian model:
    `DDPMPipeline.from_pretrained(DIR)(n=16, steps=50, sampler="ddim")` -> samples [n, ...]."""

    OPTIONS = ("steps", "sampler", "eta")

    @classmethod
    def check_config(cls, cfg: ExperimentConfig, where: Path) -> None:
        if cfg.model is not ModelType.DDPM:
            raise CheckpointError(f"{where} holds a {cfg.model.value!r} model, not a Gaussian DDPM")
        if is_text_ddpm(cfg):
            raise CheckpointError(f"{where} holds a text-to-image DDPM: sample it with `vqdiff sample PROMPT "
                                  "--model DIR`")

    @torch.no_grad()
    def sample_iter(self, n: int, generator=None, progress: bool = True, **options):
        """Yield the states of one sampling run of n examples (dicts with "sample", "pred_xstart")."""
        s = self.cfg.sample
        yield from self.diffusion.sample_iter(self.model, (n, *data_shape(self.cfg)), generator=generator,
                                              clip_denoised=s.clip_denoised and self.cfg.data.name in IMAGE_DATA,
                                              progress=progress, **self.sampling_options(**options))

    @torch.no_grad()
    def sample(self, n: int, generator=None, progress: bool = False, **options) -> torch.Tensor:
        state = None
        for state in self.sample_iter(n, generator, progress, **options):
            pass
        return state["sample"]

    def __call__(self, n: int = 16, steps=None, sampler=None, eta=None, seed: int | None = 0,
                 progress: bool = True) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        return self.sample(n, generator, progress, steps=steps, sampler=sampler, eta=eta)

    def picture(self, samples: torch.Tensor) -> Image.Image:
        """A grid of images, or a scatter plot (over the data in grey) for 2-D toy points."""
        if samples.ndim == 2:
            return scatter(samples, reference=build_dataset(self.cfg, split="val").points[:2000])
        return make_grid([to_pil(x) for x in samples], scale=max(1, 64 // samples.shape[-1]))

    def progress_frames(self, n: int = 16, steps=None, sampler=None, eta=None, seed: int | None = 0,
                        num_frames: int = 40, progress: bool = True) -> list[Image.Image]:
        """Pictures of the denoising run (about num_frames of them, the last one the result)."""
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        states = [s["sample"] for s in self.sample_iter(n, generator, progress, steps=steps, sampler=sampler,
                                                        eta=eta)]
        stride = max(1, len(states) // num_frames)
        keep = states[::stride][:-1] + [states[-1]]
        return [self.picture(s.clamp(-1, 1) if s.ndim == 4 else s) for s in keep]
