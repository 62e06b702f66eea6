"""How a Shapes text-to-image model's samples take shape, step by step:

    python scripts/trace_shapes.py --checkpoint outputs/shapes --n 100 --objects 1 --split val
    python scripts/trace_shapes.py --checkpoint outputs/shapes --n 100 --objects 2 --steps 25 --guidance 3

After recorded sampling steps every still-masked token is filled with the network's most likely x0, decoded and
scored (vqdiff/eval/trace.py). "start" is the prediction from the caption alone (every token masked); the last
row is the sample. Accuracy the early rows have and the last lacks is lost while sampling. A Gaussian DDPM is
traced by its x0 prediction at the recorded steps (the t column: the noise step it was made at).
"""

import argparse
import json

from vqdiff.data.shapes import eval_prompts
from vqdiff.errors import script_main
from vqdiff.eval.trace import trace_gaussian, trace_sampling
from vqdiff.options import SamplingStrategy
from vqdiff.pipeline import TextToImagePipeline, load_pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint or pipeline directory")
    parser.add_argument("--n", type=int, default=100, help="prompts")
    parser.add_argument("--split", default="val", choices=("val", "heldout"))
    parser.add_argument("--objects", type=int, default=None, choices=(1, 2), help="only prompts with this many")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--truncation", type=float, default=None)
    parser.add_argument("--strategy", choices=SamplingStrategy.values(), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.checkpoint, device=args.device)
    # the prompts of eval_shapes.py (seed 1000), filtered by object count
    pool = eval_prompts(args.split, 4 * args.n if args.objects else args.n, seed=1000,
                        max_objects=pipe.cfg.data.max_objects)
    prompts = [c for c, objects in pool if args.objects in (None, len(objects))][:args.n]
    if len(prompts) < args.n:
        raise SystemExit(f"only {len(prompts)} {args.split} prompts with {args.objects} objects; lower --n")
    given = dict(steps=args.steps, guidance_scale=args.guidance, truncation_rate=args.truncation,
                 strategy=args.strategy)
    options = pipe.sampling_options(**given)  # a VQ-only option given for a Gaussian model is refused here
    trace = trace_sampling if isinstance(pipe, TextToImagePipeline) else trace_gaussian
    result = trace(pipe, prompts, seed=args.seed, **given)
    print(f"# {args.checkpoint}: {result.images} {args.split} prompts"
          f"{'' if args.objects is None else f' with {args.objects} object(s)'}, {options}")
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "options": options, **vars(result)}, f, indent=2)


if __name__ == "__main__":
    script_main(main, "trace_shapes.py")
