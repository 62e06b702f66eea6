"""What training shows and measures while it runs, sampled through the inference pipelines: the sample grid of
each `train.sample_every` and the shapes attribute metric of each `train.eval_every`."""

from collections.abc import Callable

import torch
from PIL import Image

from ..build import IMAGE_DATA, build_dataset
from ..config import ExperimentConfig
from ..data.shapes import eval_prompts
from ..eval.shapes import evaluate
from ..images import make_grid
from ..pipeline import DDPMPipeline

EVAL_BATCH = 50


def preview_prompts(cfg: ExperimentConfig) -> list[str]:
    """train.num_sample_images fixed prompts: shapes val prompts, else the first val captions."""
    n = cfg.train.num_sample_images
    if cfg.data.name == "shapes":
        return [caption for caption, _ in eval_prompts("val", n, seed=cfg.data.seed, max_objects=cfg.data.max_objects)]
    dataset = build_dataset(cfg, split="val")
    return [dataset[i]["caption"] for i in range(min(n, len(dataset)))]


def text_preview(pipe, generator=None) -> Image.Image:
    """The training-time sample grid of a text-to-image pipeline: fixed prompts, each image captioned."""
    prompts = preview_prompts(pipe.cfg)
    images = pipe(prompts, generator=generator, progress=False)
    return make_grid(images, nrow=min(8, len(images)), captions=prompts, scale=max(1, 64 // pipe.cfg.data.size))


@torch.no_grad()
def ddpm_preview(cfg: ExperimentConfig, diffusion, model, generator) -> Image.Image:
    """An unconditional model's grid of train.num_sample_images images, or a scatter plot of 2000 toy points."""
    n = cfg.train.num_sample_images if cfg.data.name in IMAGE_DATA else 2000
    pipe = DDPMPipeline(cfg, model, diffusion)
    return pipe.picture(pipe.sample(n, generator))


def shapes_evaluator(cfg: ExperimentConfig, make_pipeline: Callable) -> Callable | None:
    """(ema model, generator) -> per-image attribute accuracy on train.eval_prompts val prompts, overall and by
    object count; None unless the data are shapes and train.eval_every > 0."""
    if cfg.data.name != "shapes" or cfg.train.eval_every <= 0:
        return None
    prompts = [c for c, _ in eval_prompts("val", cfg.train.eval_prompts, seed=1000, max_objects=cfg.data.max_objects)]

    def run(ema_model, generator) -> dict:
        images = make_pipeline(ema_model).generate(prompts, EVAL_BATCH, generator, desc=None)
        groups = evaluate(images, prompts).groups
        return {name: groups[name]["image"] for name in ("all", "1 object", "2 objects") if name in groups}

    return run
