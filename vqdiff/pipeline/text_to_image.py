"""Prompts -> images with a trained VQ-Diffusion model, and inpainting."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..build import build_discrete_diffusion, token_grid
from ..config import ExperimentConfig, ModelType
from ..data.images import resize_center_crop
from ..diffusion.discrete_sampling import SamplingOptions
from ..images import to_pil
from ..io.checkpoint import CheckpointError
from ..validation import check_same_size
from .base import TextPipeline


class TextToImagePipeline(TextPipeline):
    """Prompts -> PIL images with a trained VQ-Diffusion model.

        pipe = TextToImagePipeline.from_pretrained("runs/shapes/pipeline")
        images = pipe(["a large red circle at the top left"], steps=25, guidance_scale=3.0)

    Holds the tokenizer (VQ-VAE), the text encoder + DiffusionTransformer (`model`, a TextConditioned)
    and the mask-and-replace diffusion. Defaults for every sampling option come from `cfg.sample`.
    """

    NETWORK_FILE = "transformer.safetensors"
    OPTIONS = ("steps", "guidance_scale", "truncation_rate", "temperature", "strategy")
    CASTS_NETWORK = True  # the logits are float32 either way

    def __init__(self, cfg: ExperimentConfig, model, diffusion, tokenizer):
        super().__init__(cfg, model, diffusion, tokenizer)
        self.grid = token_grid(cfg, tokenizer)
        _check_parts_fit(tokenizer, model.network, self.grid, model.text_encoder.dim)

    @classmethod
    def check_config(cls, cfg: ExperimentConfig, where: Path) -> None:
        if cfg.model is not ModelType.VQ_DIFFUSION:
            raise CheckpointError(f"{where} holds a {cfg.model.value!r} model, not VQ-Diffusion")

    @classmethod
    def from_parts(cls, cfg: ExperimentConfig, tokenizer, model) -> "TextToImagePipeline":
        """A pipeline of converted parts (vqdiff.interop): the diffusion comes from the config."""
        return cls(cfg, model, build_discrete_diffusion(cfg, tokenizer.num_embeddings), tokenizer)

    # ---- sampling --------------------------------------------------------------------------------

    def conditions(self, prompts: list[str], guidance_scale: float) -> tuple[dict, dict | None]:
        """Cached cross-attention inputs for the prompts and, when guiding, for the null condition."""
        network = self.network
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
        opts = SamplingOptions(**self.sampling_options(**options))
        cond, null_cond = self.conditions(prompts, opts.guidance_scale)
        yield from self.diffusion.sample_iter(
            self.network, len(prompts), self.grid[0] * self.grid[1], cond=cond, null_cond=null_cond, options=opts,
            known_tokens=known_tokens, known_mask=known_mask, generator=generator, progress=progress,
            device=self.device)

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
        cell = F.interpolate(cell, size=images.shape[-2:], mode="nearest")
        return [to_pil(x) for x in images * (1 - cell)]

    @torch.no_grad()
    def inpaint(self, prompts, image: Image.Image, mask: Image.Image, generator=None, progress: bool = True,
                **options) -> list[Image.Image]:
        """Regenerate the white area of `mask` (any other value keeps the image), one image per prompt.

        A token is kept when every pixel it covers is kept; the rest is sampled given the kept tokens.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_same_size(image.size, mask.size)
        size = self.cfg.data.size
        pixels = image_tensor(image, size).to(self.device)
        keep = image_tensor(mask.convert("L"), size)[0] < 0  # [H, W], True where the mask is dark
        tokens = self.tokenizer.encode(pixels[None]).flatten(1)  # [1, N]
        factor = self.tokenizer.downsample_factor
        known = (-F.max_pool2d((~keep).float()[None, None], factor)).flatten(1) == 0  # [1, N]
        known_tokens = tokens.expand(len(prompts), -1)
        known_mask = known.to(self.device).expand(len(prompts), -1)
        final = None
        for final in self.sample_iter(prompts, generator, progress, known_tokens=known_tokens,
                                      known_mask=known_mask, **options):
            pass
        return self.decode(final)


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


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image of any mode -> [C, size, size] in [-1, 1] (resized shorter side, centre crop)."""
    mode = "L" if image.mode in ("L", "1") else "RGB"
    array = torch.from_numpy(np.asarray(image.convert(mode), dtype=np.uint8).copy())
    x = (array[None] if mode == "L" else array.permute(2, 0, 1)).float() / 127.5 - 1
    return resize_center_crop(x, size)
