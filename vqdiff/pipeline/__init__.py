"""Trained models as objects a user can call (inference only: never imports train/).

    pipe = load_pipeline("runs/shapes")            # a pipeline folder, a run or a checkpoint
    images = pipe(["a large red circle at the top left"], steps=25, guidance_scale=3.0)
"""

from pathlib import Path

import torch
from PIL import Image

from ..build import is_text_ddpm
from ..config import ModelType
from ..io.checkpoint import CheckpointError
from ..io.pipeline_folder import saved_config
from .base import Pipeline, TextPipeline
from .gaussian import DDPMPipeline, GaussianTextToImagePipeline
from .text_to_image import TextToImagePipeline, image_tensor

__all__ = ["DDPMPipeline", "GaussianTextToImagePipeline", "Pipeline", "TextPipeline", "TextToImagePipeline",
           "image_tensor", "load_pipeline", "save_picture"]


def load_pipeline(path, device="cpu", dtype: torch.dtype | None = None) -> TextPipeline:
    """The text-to-image pipeline of a pipeline, run or checkpoint directory, chosen by its saved config's
    `model:`: a TextToImagePipeline (VQ-Diffusion) or a GaussianTextToImagePipeline (DDPM, pixels or latents)."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} holds a tokenizer, not a text-to-image model")
    cfg = saved_config(path)
    if cfg.model is ModelType.VQVAE:
        raise CheckpointError(f"{path} holds a tokenizer run (model: vqvae), not a text-to-image model")
    if cfg.model is ModelType.DDPM and not is_text_ddpm(cfg):
        raise CheckpointError(f"{path} holds an unconditional Gaussian DDPM, not a text-to-image model: sample it "
                              f"with `vqdiff sample-ddpm --checkpoint {path}`")
    if cfg.model is ModelType.VQ_DIFFUSION:
        return TextToImagePipeline.from_pretrained(path, device, dtype)
    return GaussianTextToImagePipeline.from_pretrained(path, device, dtype)


def save_picture(image: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
