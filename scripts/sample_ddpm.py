"""Sample a trained Gaussian DDPM: `python scripts/sample_ddpm.py --checkpoint runs/ddpm_scurve --out grid.png`."""

import sys

from vqdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample-ddpm", *sys.argv[1:]]))
