"""Text-prompt sampling: `python scripts/sample_vq.py "a large red circle at the top left" --model DIR --out out.png`
(the same options as `vqdiff sample`)."""

import sys

from vqdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
