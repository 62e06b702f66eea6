"""Train a Gaussian DDPM:

    accelerate launch scripts/train_ddpm.py --config configs/ddpm_scurve.yaml [key=value ...]
"""

import sys

from vqdiff.cli import setup_logging, train_command
from vqdiff.config import ModelType

if __name__ == "__main__":
    setup_logging()
    train_command(sys.argv[1:], expect=ModelType.DDPM)
