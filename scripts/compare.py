"""Compare text-to-image models (VQ-Diffusion, pixel DDPM, latent DDPM) on the same shapes prompts and seeds:

    python scripts/compare.py --models runs/shapes runs/ddpm_shapes runs/ddpm_shapes_latent --n 500 \
        --grid compare.png --json compare.json
    python scripts/compare.py --models runs/shapes runs/ddpm_shapes_latent --options - guidance_scale=5,steps=25

Prints one markdown table: per-image attribute accuracy (one / two objects, seen / held-out pairs) on `--n` val and
`--n` held-out prompts, images/s at 10, 25, 50 and 100 steps, parameter counts, and the training time to 80%
one-object accuracy from the run's logged evaluations (train.eval_every). Writes a picture grid: the same
`--grid-prompts` prompts, one row per model. `--options` gives each model its own sampling options (one entry per
model, `-` for its config's), `--steps` / `--guidance` one setting for all.
"""

import argparse
import json
import logging
from pathlib import Path

import torch

from vqdiff.data.shapes import eval_prompts
from vqdiff.errors import UserError, script_main
from vqdiff.eval.compare import STEP_COUNTS, compare, markdown_table, sample_images, side_by_side
from vqdiff.pipeline import load_pipeline


def model_options(given: list[str] | None, count: int) -> list[dict]:
    """`--options` entries ("key=value,key=value" or "-") -> one dict per model; numbers become int / float."""
    if given is None:
        return [{} for _ in range(count)]
    if len(given) != count:
        raise UserError(f"--options: {len(given)} entries for {count} models (one per model, - for none)")
    parsed = []
    for entry in given:
        options = {}
        for item in ([] if entry == "-" else entry.split(",")):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--options: {item!r} is not key=value")
            options[key] = number(value)
        parsed.append(options)
    return parsed


def number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="run, checkpoint or pipeline directories")
    parser.add_argument("--n", type=int, default=500, help="prompts per split (val and held-out)")
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--steps", default=None, help="accuracy-run steps (default: each model's config)")
    parser.add_argument("--guidance", type=float, default=None, help="default: each model's config")
    parser.add_argument("--options", nargs="+", default=None,
                        help="per model, in --models order: key=value[,key=value] sampling options, or - for none")
    parser.add_argument("--step-counts", nargs="+", type=int, default=list(STEP_COUNTS), help="for images/s")
    parser.add_argument("--speed-n", type=int, default=16, help="prompts (one batch) per images/s measurement")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", default="compare.png", help="side-by-side PNG")
    parser.add_argument("--grid-prompts", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    names = [Path(m).resolve().name for m in args.models]
    names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    pipes = {name: load_pipeline(path, device=args.device) for name, path in zip(names, args.models)}
    prompts = [c for split in ("val", "heldout") for c, _ in eval_prompts(split, args.n, seed=1000,
                                                                          max_objects=args.max_objects)]
    steps = int(args.steps) if args.steps and args.steps.isdigit() else args.steps
    per_model = model_options(args.options, len(args.models))
    for pipe, options in zip(pipes.values(), per_model):
        pipe.sampling_options(**options)  # an option the model does not take is refused before any sampling
    rows = compare(pipes, prompts, prompts[:args.speed_n], args.batch_size, args.seed, tuple(args.step_counts),
                   log_dirs=dict(zip(names, args.models)), per_model=dict(zip(names, per_model)), steps=steps,
                   guidance_scale=args.guidance)
    print(f"# {len(prompts)} prompts ({args.n} val + {args.n} held-out), seed {args.seed}, {args.device} "
          f"({torch.get_num_threads()} threads); per-image all-attribute accuracy")
    print(markdown_table(rows))
    for row in rows:
        print(f"# {row['model']}: " + ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in row["options"].items()))

    half = args.grid_prompts // 2  # val and held-out prompts
    shown = prompts[:args.grid_prompts - half] + prompts[args.n:args.n + half]
    options = {k: v for k, v in dict(steps=steps, guidance_scale=args.guidance).items() if v is not None}
    pictures = [sample_images(pipe, shown, len(shown), args.seed, **{**options, **own})
                for pipe, own in zip(pipes.values(), per_model)]
    side_by_side(names, pictures, shown).save(args.grid)
    logging.info("wrote %s", args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    script_main(main, "compare.py")
