"""Side-by-side comparison of text-to-image models on the shapes prompts (scripts/compare.py).

A pipeline is anything called as `pipe(prompts, generator, progress=False, **options) -> [PIL images]` with `cfg`,
`device`, `model` (network + text_encoder) and `tokenizer` (None for pixel models): TextToImagePipeline and
GaussianTextToImagePipeline both are. Every model gets the same prompts and the same seed.
"""

import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..config import DiffusionSpace, ModelType
from ..images import make_grid
from ..io.run_log import read_log
from .shapes import evaluate

GROUPS = ("1 object", "2 objects", "seen", "held-out")
STEP_COUNTS = (10, 25, 50, 100)


def model_kind(cfg) -> str:
    if cfg.model is ModelType.VQ_DIFFUSION:
        return "VQ-Diffusion"
    return "DDPM latent" if cfg.gaussian.space is DiffusionSpace.LATENT else "DDPM pixel"


def sample_images(pipe, prompts: list[str], batch_size: int, seed: int, desc: str | None = None,
                  **options) -> list[Image.Image]:
    """Images for `prompts` in batches from one seeded generator; `desc` shows a progress bar over the batches."""
    return pipe.generate(prompts, batch_size, torch.Generator(pipe.device).manual_seed(seed), desc=desc, **options)


def accuracies(images: list[Image.Image], prompts: list[str]) -> dict[str, float | None]:
    """Per-image all-attribute accuracy by object count and seen / held-out pairs (None: no such prompt)."""
    groups = evaluate(images, prompts).groups
    return {name: groups[name]["image"] if name in groups else None for name in GROUPS}


def images_per_second(pipe, prompts: list[str], steps: int, seed: int, **options) -> float:
    """One batch of `prompts` end to end (text encoding, sampling, decoding), after a one-prompt warm-up."""
    sample_images(pipe, prompts[:1], 1, seed, steps=steps, **options)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    started = time.perf_counter()
    sample_images(pipe, prompts, len(prompts), seed, steps=steps, **options)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return len(prompts) / (time.perf_counter() - started)


def parameter_counts(pipe) -> dict[str, int]:
    def count(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())
    return {"network": count(pipe.model.network), "text_encoder": count(pipe.model.text_encoder),
            "tokenizer": count(pipe.tokenizer)}


def run_log(model_dir: "str | Path") -> Path | None:
    """log.jsonl of the training run a run or checkpoint directory belongs to (pipeline directories have none)."""
    path = Path(model_dir)
    return next((d / "log.jsonl" for d in (path, path.parent.parent) if (d / "log.jsonl").is_file()), None)


def logged_evaluations(log_path: Path | None, group: str = "1 object") -> list[tuple[float, float]]:
    """(training seconds, `group` per-image accuracy) of each evaluation a run logged (train.eval_every)."""
    if log_path is None:
        return []
    return [(record["trained_s"], record["eval"][group]) for record in read_log(log_path)
            if group in record.get("eval", {})]


def time_to_accuracy(log_path: Path | None, threshold: float = 0.8, group: str = "1 object") -> float | str:
    """Training seconds at the first logged evaluation (train.eval_every) whose `group` per-image accuracy reaches
    `threshold`; "not logged" without such evaluations, "not reached" when none reaches it."""
    evaluations = logged_evaluations(log_path, group)
    if not evaluations:
        return "not logged"
    return next((seconds for seconds, accuracy in evaluations if accuracy >= threshold), "not reached")


def compare(named_pipes: dict, prompts: list[str], speed_prompts: list[str], batch_size: int = 50, seed: int = 0,
            step_counts=STEP_COUNTS, log_dirs: dict | None = None, per_model: dict | None = None,
            **options) -> list[dict]:
    """One row per model: kind, parameter counts, accuracies, images/s per step count, time to 80% one-object.

    `options` (steps, guidance_scale; None = each model's config) apply to every model's accuracy run, and
    `per_model[name]` (a dict of sampling options) to that model's on top; the speed runs use each model's
    options except the step count. VQ-Diffusion step counts are capped at its T."""
    rows = []
    for name, pipe in named_pipes.items():
        chosen = {k: v for k, v in options.items() if v is not None} | (per_model or {}).get(name, {})
        row = {"model": name, "kind": model_kind(pipe.cfg), "options": pipe.sampling_options(**chosen),
               "parameters": parameter_counts(pipe),
               "accuracy": accuracies(sample_images(pipe, prompts, batch_size, seed, desc=name, **chosen), prompts)}
        speed_options = {k: v for k, v in chosen.items() if k != "steps"}
        row["images_per_s"] = {n: images_per_second(pipe, speed_prompts, min(n, pipe.diffusion.num_timesteps), seed,
                                                    **speed_options) for n in step_counts}
        row["seconds_to_80"] = time_to_accuracy(run_log((log_dirs or {}).get(name, name)))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    steps = list(rows[0]["images_per_s"]) if rows else []
    header = (["model", "kind", "network", "text encoder", "tokenizer"] + [f"{g} %" for g in GROUPS]
              + [f"img/s @{n}" for n in steps] + ["train time to 80% 1-object"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        p, acc, t = row["parameters"], row["accuracy"], row["seconds_to_80"]
        cells = ([row["model"], row["kind"], f"{p['network'] / 1e6:.2f}M", f"{p['text_encoder'] / 1e6:.2f}M",
                  f"{p['tokenizer'] / 1e6:.2f}M" if p["tokenizer"] else "-"]
                 + ["-" if acc[g] is None else f"{100 * acc[g]:.1f}" for g in GROUPS]
                 + [f"{row['images_per_s'][n]:.2f}" for n in steps]
                 + [t if isinstance(t, str) else f"{t / 60:.1f} min"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def side_by_side(names: list[str], rows: list[list[Image.Image]], prompts: list[str], tile: int = 128,
                 label_width: int = 150) -> Image.Image:
    """One row per model (its name on the left), one column per prompt (captioned under the first row)."""
    scale = max(1, math.ceil(tile / rows[0][0].width))
    caption_width = (rows[0][0].width * scale - 4) // 6  # captions no wider than a tile keep the columns aligned
    grids = [make_grid(images, nrow=len(images), captions=prompts if i == 0 else None, scale=scale,
                       caption_width=caption_width) for i, images in enumerate(rows)]
    canvas = Image.new("RGB", (label_width + max(g.width for g in grids), sum(g.height for g in grids)), "white")
    draw, font, y = ImageDraw.Draw(canvas), ImageFont.load_default(), 0
    for name, grid in zip(names, grids):
        canvas.paste(grid, (label_width, y))
        draw.text((4, y + rows[0][0].height * scale // 2), name[:24], fill=(0, 0, 0), font=font)
        y += grid.height
    return canvas
