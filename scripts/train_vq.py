"""Train a text-to-image VQ-Diffusion model:
`accelerate launch scripts/train_vq.py --config configs/shapes.yaml [--resume auto] [key=value ...]`."""

from vqdiff.cli import setup_logging, train_command
from vqdiff.config import ModelType
from vqdiff.errors import script_main

if __name__ == "__main__":
    setup_logging()
    script_main(lambda argv: train_command(argv, expect=ModelType.VQ_DIFFUSION), "train_vq.py")
