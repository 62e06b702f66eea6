"""Score a text-to-image model on the shapes prompts:
`python scripts/eval_shapes.py --checkpoint runs/shapes --n 500 --steps 25 --guidance 3 --grid eval.png`."""

import sys

from vqdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-shapes", *sys.argv[1:]]))
