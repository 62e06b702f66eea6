"""Shapes-metric sweeps of a trained text-to-image model, printed as markdown tables.

    python scripts/sweep_shapes.py --checkpoint outputs/shapes --table strategies --n 50
    python scripts/sweep_shapes.py --checkpoint outputs/shapes --table guidance --n 100
    python scripts/sweep_shapes.py --checkpoint outputs/shapes --table truncation --n 100
    python scripts/sweep_shapes.py --checkpoint runs/ddpm_shapes --table steps --n 100     # any model

strategies: ancestral and purity, unguided and with the config's guidance scale, at 10/25/50/100 steps.
guidance: scales 1, 2, 3, 5 at 25 steps; truncation: rates 1, 0.95, 0.86, 0.7, 0.5 at 25 steps; steps: 10, 25,
50, 100 steps (the config's other options). Gaussian DDPMs take the guidance and steps tables. Every cell samples
the same `--n` val and `--n` held-out prompts with the same seed and reports per-image all-attribute accuracy
(one-object, two-object, seen, held-out) and images/s.
"""

import argparse
import json
import time

from vqdiff.data.shapes import eval_prompts
from vqdiff.errors import UserError, script_main
from vqdiff.eval.compare import GROUPS, accuracies, sample_images
from vqdiff.pipeline import TextToImagePipeline, load_pipeline

VQ_TABLES = ("strategies", "truncation")


def cells(table: str, guidance: float, num_timesteps: int) -> list[dict]:
    """The options of each row; step counts are capped at the model's T."""
    if table == "strategies":
        return [dict(strategy=s, guidance_scale=g, steps=min(n, num_timesteps)) for s in ("ancestral", "purity")
                for g in (1.0, guidance) for n in (10, 25, 50, 100)]
    steps = min(25, num_timesteps)
    if table == "steps":
        return [dict(steps=min(n, num_timesteps)) for n in (10, 25, 50, 100)]
    if table == "guidance":
        return [dict(guidance_scale=g, steps=steps) for g in (1.0, 2.0, 3.0, 5.0)]
    return [dict(truncation_rate=r, steps=steps) for r in (1.0, 0.95, 0.86, 0.7, 0.5)]


def run_cell(pipe, prompts: list[str], options: dict, batch_size: int, seed: int) -> dict:
    started = time.perf_counter()
    images = sample_images(pipe, prompts, batch_size, seed, **options)
    seconds = time.perf_counter() - started
    return {"options": pipe.sampling_options(**options), "accuracy": accuracies(images, prompts),
            "images_per_s": len(images) / seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint or pipeline directory")
    parser.add_argument("--table", choices=("strategies", "guidance", "truncation", "steps"), required=True)
    parser.add_argument("--n", type=int, default=50, help="prompts per split (val and held-out)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-seed", type=int, default=1000, help="which prompts (1000: eval_shapes.py's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.checkpoint, device=args.device)
    if args.table in VQ_TABLES and not isinstance(pipe, TextToImagePipeline):
        raise UserError(f"--table {args.table}: a VQ-Diffusion table; {args.checkpoint} holds a Gaussian model "
                        f"(use --table guidance or steps)")
    max_objects = pipe.cfg.data.max_objects
    prompts = [c for split in ("val", "heldout") for c, _ in eval_prompts(split, args.n, args.prompt_seed,
                                                                          max_objects=max_objects)]
    guidance = pipe.cfg.sample.guidance_scale if pipe.cfg.sample.guidance_scale != 1.0 else 3.0
    print(f"# {args.checkpoint}: {len(prompts)} prompts per cell ({args.n} val + {args.n} held-out), "
          f"per-image all-attribute accuracy in %")
    vq = isinstance(pipe, TextToImagePipeline)
    columns = ["strategy", "steps", "guidance", "truncation"] if vq else ["sampler", "steps", "guidance"]
    print("| " + " | ".join(columns + list(GROUPS)) + " | img/s |")
    print("|---" * (len(columns) + 1 + len(GROUPS)) + "|")
    rows = []
    for options in cells(args.table, guidance, pipe.diffusion.num_timesteps):
        row = run_cell(pipe, prompts, options, args.batch_size, args.seed)
        rows.append(row)
        o = row["options"]
        accuracy = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in row["accuracy"].values())
        settings = ([o["strategy"], o["steps"], f"{o['guidance_scale']:g}", f"{o['truncation_rate']:g}"] if vq
                    else [getattr(o["sampler"], "value", o["sampler"]), o["steps"], f"{o['guidance_scale']:g}"])
        print("| " + " | ".join(map(str, settings)) + f" | {accuracy} | {row['images_per_s']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    script_main(main, "sweep_shapes.py")
