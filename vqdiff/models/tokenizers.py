"""The image tokenizer classes, by the `type` name that a saved tokenizer's config.json records."""

from torch import nn

from .patch_vqgan import PatchVQGAN
from .vqvae import GumbelVQVAE

TOKENIZER_TYPES = {"gumbel_vqvae": GumbelVQVAE, "patch_vqgan": PatchVQGAN}
DEFAULT_TYPE = "gumbel_vqvae"  # tokenizers saved before the field existed


def tokenizer_type(model: nn.Module) -> str:
    for name, cls in TOKENIZER_TYPES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not an image tokenizer class ({sorted(TOKENIZER_TYPES)})")
