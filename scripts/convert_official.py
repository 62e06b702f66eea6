"""A released VQ-Diffusion checkpoint -> a vqdiff pipeline directory:
`python scripts/convert_official.py coco_learnable.pth --out models/coco --codes-map taming_vqvae_2887.pt`
(the same options as `vqdiff convert official`)."""

import sys

from vqdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "official", *sys.argv[1:]]))
