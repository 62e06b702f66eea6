"""Trained models as objects a user can call: load a checkpoint, get samples and pictures."""

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import build
from .config import ConfigError, ExperimentConfig, ModelType
from .gaussian_pipeline import GaussianTextToImagePipeline
from .images import make_grid, scatter, to_pil
from .io.checkpoint import CheckpointError, load_into, load_weights, read_config, resolve_checkpoint
from .io.pipeline_folder import (TEXT_ENCODER_FILE, TOKENIZER_DIR, find_pipeline_folder, load_parts,
                                 check_complete, saved_config, write_pipeline_folder)
from .io.tokenizer import load_tokenizer


def ddpm_sample_iter(cfg: ExperimentConfig, diffusion, model, n: int, generator=None, steps=None,
                     sampler=None, eta=None, progress: bool = False):
    """Yield the states of one Gaussian sampling run of n examples (dicts with "sample", "pred_xstart")."""
    s = cfg.sample
    return diffusion.sample_iter(model, (n, *build.data_shape(cfg)), steps=steps if steps is not None else s.steps,
                                 sampler=sampler or s.sampler, eta=s.eta if eta is None else eta,
                                 clip_denoised=s.clip_denoised and cfg.data.name in build.IMAGE_DATA,
                                 generator=generator, progress=progress)


def ddpm_sample(cfg, diffusion, model, n, generator=None, steps=None, sampler=None, eta=None,
                progress=False) -> torch.Tensor:
    state = None
    for state in ddpm_sample_iter(cfg, diffusion, model, n, generator, steps, sampler, eta, progress):
        pass
    return state["sample"]


def ddpm_picture(cfg: ExperimentConfig, samples: torch.Tensor) -> Image.Image:
    """A grid of images, or a scatter plot (over the data in grey) for 2-D toy points."""
    if samples.ndim == 2:
        return scatter(samples, reference=build.build_dataset(cfg, split="val").points[:2000])
    return make_grid([to_pil(x) for x in samples], scale=max(1, 64 // samples.shape[-1]))


class DDPMPipeline:
    """A trained Gaussian model: `DDPMPipeline.from_checkpoint(DIR)(n=16, steps=50, sampler="ddim")`."""

    def __init__(self, cfg: ExperimentConfig, model, diffusion):
        self.cfg, self.model, self.diffusion = cfg, model.eval(), diffusion

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "DDPMPipeline":
        checkpoint = resolve_checkpoint(path)
        cfg = read_config(checkpoint)
        if cfg.model is not ModelType.DDPM:
            raise CheckpointError(f"{checkpoint} holds a {cfg.model.value!r} model, not a Gaussian DDPM")
        if build.is_text_ddpm(cfg):
            raise CheckpointError(f"{checkpoint} holds a text-to-image DDPM: sample it with `vqdiff sample PROMPT "
                                  "--model DIR`")
        model, diffusion = build.build_model_and_diffusion(cfg)
        load_into(model, load_weights(checkpoint / "ema.safetensors"), f"{checkpoint}/ema.safetensors")
        return cls(cfg, model.to(device), diffusion)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, n: int = 16, steps=None, sampler=None, eta=None, seed: int | None = 0,
                 progress: bool = True) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        return ddpm_sample(self.cfg, self.diffusion, self.model, n, generator, steps, sampler, eta, progress)

    @torch.no_grad()
    def progress_frames(self, n: int = 16, steps=None, sampler=None, eta=None, seed: int | None = 0,
                        num_frames: int = 40, progress: bool = True) -> list[Image.Image]:
        """Pictures of the denoising run (about num_frames of them, the last one the result)."""
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        states = [s["sample"] for s in ddpm_sample_iter(self.cfg, self.diffusion, self.model, n, generator,
                                                        steps, sampler, eta, progress)]
        stride = max(1, len(states) // num_frames)
        keep = states[::stride][:-1] + [states[-1]]
        return [ddpm_picture(self.cfg, s.clamp(-1, 1) if s.ndim == 4 else s) for s in keep]


def save_picture(image: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ---- text to image (VQ-Diffusion) ------------------------------------------------------------------

PIPELINE_FILES = ("config.yaml", "transformer.safetensors", "text_encoder.safetensors", "tokenizer")


class TextToImagePipeline:
    """Prompts -> PIL images with a trained VQ-Diffusion model.

        pipe = TextToImagePipeline.from_pretrained("runs/shapes/pipeline")
        images = pipe(["a large red circle at the top left"], steps=25, guidance_scale=3.0)

    Holds the tokenizer (VQ-VAE), the text encoder + DiffusionTransformer (`model`, a TextConditioned)
    and the mask-and-replace diffusion. Defaults for every sampling option come from `cfg.sample`.
    """

    def __init__(self, cfg: ExperimentConfig, tokenizer, model, diffusion):
        self.cfg, self.tokenizer, self.model, self.diffusion = cfg, tokenizer.eval(), model.eval(), diffusion
        self.grid = build.token_grid(cfg, tokenizer)
        _check_parts_fit(tokenizer, model.network, self.grid, model.text_encoder.dim)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device, dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """Move every part to `device`; `dtype` (e.g. torch.bfloat16 on a GPU) casts the DiffusionTransformer
        only: the text encoder and the tokenizer stay float32, the logits are float32 either way."""
        self.tokenizer.to(device)
        self.model.to(device)
        if dtype is not None:
            self.model.network.to(dtype)
        return self

    def compile(self, mode: str | None = None) -> "TextToImagePipeline":
        """torch.compile the DiffusionTransformer's forward (GPUs: fuses its elementwise ops, ~13% faster for
        the B preset on an H200; the first call of each batch size compiles for a minute). mode
        "reduce-overhead" adds CUDA graphs, for small models and batches whose steps are launch-bound."""
        network = self.model.network
        network.forward = torch.compile(network.forward, mode=mode)
        return self

    # ---- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None) -> "TextToImagePipeline":
        """A directory written by save_pretrained, or a training run / checkpoint (its EMA weights); see `to`
        for dtype."""
        folder = find_pipeline_folder(path, "transformer.safetensors")
        if folder is not None:
            return cls._from_pipeline_dir(folder).to(device, dtype)
        checkpoint = resolve_checkpoint(path)
        cfg = read_config(checkpoint)
        if cfg.model is not ModelType.VQ_DIFFUSION:
            raise CheckpointError(f"{checkpoint} holds a {cfg.model.value!r} model, not VQ-Diffusion")
        tokenizer = build.load_configured_tokenizer(cfg)
        model, diffusion = build.build_model_and_diffusion(cfg, tokenizer)
        load_into(model, load_weights(checkpoint / "ema.safetensors"), f"{checkpoint}/ema.safetensors")
        return cls(cfg, tokenizer, model, diffusion).to(device, dtype)

    @classmethod
    def from_official(cls, checkpoint, codes_map=None, weights: str = "ema",
                      trust_pickle: bool = False) -> "TextToImagePipeline":
        """A released VQ-Diffusion `.pth` (COCO/CUB/CC with its codes map `taming_vqvae_2887.pt`, or ITHQ), see
        vqdiff.interop.official.load_official; `save_pretrained` then writes it as a vqdiff directory."""
        from .interop.official import load_official
        from .models.conditioned import TextConditioned
        cfg, tokenizer, network, text_encoder = load_official(checkpoint, codes_map, weights, trust_pickle)
        return cls(cfg, tokenizer, TextConditioned(network, text_encoder),
                   build.build_discrete_diffusion(cfg, tokenizer.num_embeddings))

    @classmethod
    def _from_pipeline_dir(cls, path: Path) -> "TextToImagePipeline":
        check_complete(path, PIPELINE_FILES)
        cfg = read_config(path)
        tokenizer = load_tokenizer(path / TOKENIZER_DIR)
        built = copy.deepcopy(cfg)
        if cfg.text.weights == "text_encoder.safetensors":  # the directory's own copy (converted pipelines)
            built.text.weights = str(path / "text_encoder.safetensors")
        model, diffusion = build.build_model_and_diffusion(built, tokenizer)
        load_parts(path, {"transformer.safetensors": model.network, TEXT_ENCODER_FILE: model.text_encoder})
        return cls(cfg, tokenizer, model, diffusion)

    def save_pretrained(self, path) -> Path:
        """config.yaml, tokenizer/, transformer.safetensors, text_encoder.safetensors (written atomically)."""
        return write_pipeline_folder(path, self.cfg, {"transformer.safetensors": self.model.network,
                                                      TEXT_ENCODER_FILE: self.model.text_encoder}, self.tokenizer)

    # ---- sampling --------------------------------------------------------------------------------

    def sampling_options(self, **given) -> dict:
        """steps, guidance_scale, truncation_rate, temperature, strategy: those given (not None), else cfg.sample's."""
        s = self.cfg.sample
        defaults = dict(steps=s.steps, guidance_scale=s.guidance_scale, truncation_rate=s.truncation_rate,
                        temperature=s.temperature, strategy=s.strategy)
        return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}

    def conditions(self, prompts: list[str], guidance_scale: float) -> tuple[dict, dict | None]:
        """Cached cross-attention inputs for the prompts and, when guiding, for the null condition."""
        network = self.model.network
        dtype = next(network.parameters()).dtype
        text, mask = self.model.encode_text(prompts)
        cond = network.cache_text(text.to(dtype), mask)
        if guidance_scale == 1.0:
            return cond, None
        if network.empty_text_embed is not None:
            null_text, null_mask = network.null_text(len(prompts))
        else:
            null_text, null_mask = self.model.encode_text([""] * len(prompts))
        return cond, network.cache_text(null_text.to(dtype), null_mask)

    @torch.no_grad()
    def sample_iter(self, prompts, generator=None, progress: bool = True, known_tokens=None, known_mask=None,
                    **options):
        """Yield token maps [B, N] after each step (the last has no [MASK])."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        opts = self.sampling_options(**options)
        cond, null_cond = self.conditions(prompts, opts["guidance_scale"])
        yield from self.diffusion.sample_iter(
            self.model.network, len(prompts), self.grid[0] * self.grid[1], cond=cond, null_cond=null_cond,
            known_tokens=known_tokens, known_mask=known_mask, generator=generator, progress=progress,
            device=self.device, **opts)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Token maps [B, N] (no [MASK]) -> PIL images."""
        images = self.tokenizer.decode(tokens.reshape(-1, *self.grid))
        return [to_pil(x) for x in images]

    @torch.no_grad()
    def decode_partial(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Like decode, with [MASK] tokens shown as grey (for progress pictures)."""
        masked = tokens == self.diffusion.mask_id
        images = self.tokenizer.decode(tokens.masked_fill(masked, 0).reshape(-1, *self.grid))
        cell = masked.reshape(-1, 1, *self.grid).float()
        cell = torch.nn.functional.interpolate(cell, size=images.shape[-2:], mode="nearest")
        return [to_pil(x) for x in images * (1 - cell)]

    @torch.no_grad()
    def __call__(self, prompts, generator=None, progress: bool = True, **options) -> list[Image.Image]:
        """One image per prompt. Options: steps, guidance_scale, truncation_rate, temperature, strategy."""
        tokens = None
        for tokens in self.sample_iter(prompts, generator, progress, **options):
            pass
        return self.decode(tokens)

    @torch.no_grad()
    def inpaint(self, prompts, image: Image.Image, mask: Image.Image, generator=None, progress: bool = True,
                **options) -> list[Image.Image]:
        """Regenerate the white area of `mask` (any other value keeps the image), one image per prompt.

        A token is kept when every pixel it covers is kept; the rest is sampled given the kept tokens.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        size = self.cfg.data.size
        pixels = _image_tensor(image, size).to(self.device)
        keep = _image_tensor(mask.convert("L"), size)[0] < 0  # [H, W], True where the mask is dark
        tokens = self.tokenizer.encode(pixels[None]).flatten(1)  # [1, N]
        factor = self.tokenizer.downsample_factor
        known = (-torch.nn.functional.max_pool2d((~keep).float()[None, None], factor)).flatten(1) == 0  # [1, N]
        known_tokens = tokens.expand(len(prompts), -1)
        known_mask = known.to(self.device).expand(len(prompts), -1)
        final = None
        for final in self.sample_iter(prompts, generator, progress, known_tokens=known_tokens,
                                      known_mask=known_mask, **options):
            pass
        return self.decode(final)


def load_pipeline(path, device="cpu", dtype: torch.dtype | None = None):
    """The text-to-image pipeline of a pipeline, run or checkpoint directory, chosen by its saved config's
    `model:`: a TextToImagePipeline (VQ-Diffusion) or a GaussianTextToImagePipeline (DDPM, pixels or latents)."""
    cfg = saved_config(path)
    if cfg.model is ModelType.VQ_DIFFUSION:
        return TextToImagePipeline.from_pretrained(path, device, dtype)
    if dtype is not None:
        raise ConfigError("a dtype cast is for VQ-Diffusion transformers; Gaussian models sample in float32")
    return GaussianTextToImagePipeline.from_pretrained(path, device)


def _check_parts_fit(tokenizer, network, grid, text_dim) -> None:
    problems = []
    if tokenizer.num_embeddings != network.num_classes:
        problems.append(f"the tokenizer has {tokenizer.num_embeddings} codes but the transformer predicts "
                        f"{network.num_classes} classes")
    if tuple(grid) != tuple(network.grid_size):
        problems.append(f"the tokenizer makes a {grid[0]}x{grid[1]} token grid but the transformer expects "
                        f"{network.grid_size[0]}x{network.grid_size[1]}")
    if text_dim != network.text_dim:
        problems.append(f"the text encoder gives {text_dim}-d features but the transformer reads {network.text_dim}-d")
    if problems:
        raise CheckpointError("the pipeline's parts do not fit together: " + "; ".join(problems))


def _image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image of any mode -> [C, size, size] in [-1, 1] (resized shorter side, centre crop)."""
    from .data.images import resize_center_crop
    mode = "L" if image.mode in ("L", "1") else "RGB"
    array = torch.from_numpy(np.asarray(image.convert(mode), dtype=np.uint8).copy())
    x = (array[None] if mode == "L" else array.permute(2, 0, 1)).float() / 127.5 - 1
    return resize_center_crop(x, size)
