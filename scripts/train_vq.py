"""Train a text-to-image VQ-Diffusion model:
`accelerate launch scripts/train_vq.py --config configs/shapes.yaml [--resume auto] [key=value ...]`."""

import sys

from vqdiff.cli import setup_logging, train_command
from vqdiff.config import ModelType

if __name__ == "__main__":
    setup_logging()
    train_command(sys.argv[1:], expect=ModelType.VQ_DIFFUSION)
