"""Which caption words a trained text-to-image model ties to the image, without sampling:

    python scripts/probe_shapes.py --checkpoint outputs/shapes --n 100            # every token masked (t = T-1)
    python scripts/probe_shapes.py --checkpoint outputs/shapes --n 100 --t 50     # x_t noised to step 50

For each one-object val image and each attribute, every rewrite of the caption with another value of that
attribute is scored by log p(x0 | x_t, caption); "identified" is the share of images whose true caption scores
highest (vqdiff/eval/probe.py). An attribute identified here but wrong in samples is lost while sampling.
"""

import argparse
import json

from vqdiff.errors import script_main
from vqdiff.eval.probe import probe_attributes
from vqdiff.pipeline import TextToImagePipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint or pipeline directory")
    parser.add_argument("--n", type=int, default=100, help="one-object images")
    parser.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    parser.add_argument("--t", type=int, default=None, help="noise step of x_t (default: every token masked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint, device=args.device)
    result = probe_attributes(pipe, args.n, args.split, args.t, args.seed)
    where = "every token masked" if args.t is None else f"x_t at t = {args.t}"
    print(f"# {args.checkpoint}: {result.images} one-object {args.split} images, {where}")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "t": args.t, **vars(result)}, f, indent=2)


if __name__ == "__main__":
    script_main(main, "probe_shapes.py")
