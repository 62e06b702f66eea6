"""Shared by the diffusers converters: the error type, the optional import, exact loading and key renaming."""

import re

from torch import nn

from ...errors import UserError
from ...models.loading import load_exactly as load_checked


class DiffusersConversionError(UserError, ValueError):
    """A model that a VQDiffusionPipeline folder cannot hold exactly, or a folder vqdiff cannot read."""


def require_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise DiffusersConversionError("converting to or from diffusers needs the optional `diffusers` package "
                                       "(pip install -e '.[dev]', or pip install diffusers)") from error
    return diffusers


def load_exactly(module: nn.Module, state: dict, what: str) -> None:
    load_checked(module, state, what, error=DiffusersConversionError)


def rename(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key
