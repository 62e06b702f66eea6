"""Which caption words a trained text-to-image model ties to the image, without sampling:

    python scripts/probe_shapes.py --checkpoint outputs/shapes --n 100            # every token masked (t = T-1)
    python scripts/probe_shapes.py --checkpoint outputs/shapes --n 100 --t 50     # x_t noised to step 50
    python scripts/probe_shapes.py --checkpoint runs/ddpm_shapes --n 100 --t 100 300 500 700 900   # Gaussian

For each one-object val image and each attribute, every rewrite of the caption with another value of that
attribute is scored by log p(x0 | x_t, caption); "identified" is the share of images whose true caption scores
highest (vqdiff/eval/probe.py). An attribute identified here but wrong in samples is lost while sampling.
A Gaussian DDPM scores each rewrite by its training loss at step t (one noise draw for all rewrites); it needs
`--t`, and several steps show from which noise level on the caption is read.
"""

import argparse
import json

from vqdiff.errors import script_main
from vqdiff.eval.probe import probe_attributes
from vqdiff.pipeline import load_pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint or pipeline directory")
    parser.add_argument("--n", type=int, default=100, help="one-object images")
    parser.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    parser.add_argument("--t", type=int, nargs="+", default=[None],
                        help="noise steps of x_t, one table each (VQ-Diffusion default: every token masked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.checkpoint, device=args.device)
    results = []
    for t in args.t:
        result = probe_attributes(pipe, args.n, args.split, t, args.seed)
        where = "every token masked" if t is None else f"x_t at t = {t}"
        print(f"# {args.checkpoint}: {result.images} one-object {args.split} images, {where}")
        print(result.table())
        results.append({"checkpoint": args.checkpoint, "t": t, **vars(result)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)


if __name__ == "__main__":
    script_main(main, "probe_shapes.py")
