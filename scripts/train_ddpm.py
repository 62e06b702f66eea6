"""Train a Gaussian DDPM:

    accelerate launch scripts/train_ddpm.py --config configs/ddpm_scurve.yaml [key=value ...]
"""

from vqdiff.cli import setup_logging, train_command
from vqdiff.config import ModelType
from vqdiff.errors import script_main

if __name__ == "__main__":
    setup_logging()
    script_main(lambda argv: train_command(argv, expect=ModelType.DDPM), "train_ddpm.py")
