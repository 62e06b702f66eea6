"""A trained tokenizer on disk: a directory with `config.json` (the model's config plus its `type`, a key of
models/tokenizers.py's TOKENIZER_TYPES; "gumbel_vqvae" when absent) and `model.safetensors`.

This is what `train_vqvae` leaves in `<run>/tokenizer/` (trimmed to the used codes) and what VQ-Diffusion
configs point `tokenizer.path` at. `tokenizer_hash` (sha256 of the weights file) ties token caches to it.
"""

import json
import os
import shutil
from pathlib import Path

from ..data.tokens import tokenizer_hash
from ..models.patch_vqgan import PatchVQGAN
from ..models.tokenizers import DEFAULT_TYPE, TOKENIZER_TYPES, tokenizer_type
from ..models.vqvae import GumbelVQVAE
from .checkpoint import CheckpointError, load_into, load_weights, save_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_tokenizer", "save_tokenizer", "tokenizer_hash"]


def save_tokenizer(model: "GumbelVQVAE | PatchVQGAN", directory: "str | Path") -> Path:
    """Write config.json + model.safetensors into `directory` (replaced whole, via a temp dir and a rename)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_FILE).write_text(json.dumps({"type": tokenizer_type(model), **model.config}, indent=2) + "\n")
    save_weights(model.state_dict(), tmp / WEIGHTS_FILE)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_tokenizer(directory: "str | Path", device: str = "cpu") -> "GumbelVQVAE | PatchVQGAN":
    """The tokenizer saved in `directory`, in eval mode, on `device`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist (expected {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}, as written by scripts/train_vqvae.py into <run>/tokenizer/)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"tokenizer directory {directory} has no {name}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        kind = config.pop("type", DEFAULT_TYPE)
        if kind not in TOKENIZER_TYPES:
            raise ValueError(f"type {kind!r} is not one of {sorted(TOKENIZER_TYPES)}")
        model = TOKENIZER_TYPES[kind].from_config(config)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a tokenizer config: {error}") from error
    load_into(model, load_weights(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
    return model.to(device).eval()

