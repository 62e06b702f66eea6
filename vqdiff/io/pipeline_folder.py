"""A pipeline folder: what a pipeline's `save_pretrained` writes and its `from_pretrained` reads.

    <dir>/config.yaml                 the resolved config; tokenizer.path "tokenizer" when the folder holds one
    <dir>/tokenizer/                  the tokenizer (VQ-Diffusion, latent Gaussian), see io/tokenizer.py
    <dir>/transformer.safetensors     the network: transformer.safetensors (VQ-Diffusion) or unet.safetensors
    <dir>/text_encoder.safetensors    the text encoder

Written atomically (a temporary sibling renamed when complete). A training run keeps one in `<run>/pipeline`.
"""

import copy
from pathlib import Path

from torch import nn

from ..config import ExperimentConfig, save_config
from .checkpoint import (CheckpointError, atomic_directory, load_into, load_weights, read_config, resolve_checkpoint,
                         save_weights)
from .tokenizer import save_tokenizer

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
TEXT_ENCODER_FILE = "text_encoder.safetensors"


def find_pipeline_folder(path: "str | Path", network_file: str) -> Path | None:
    """`path`, else `path/pipeline`, when it holds `network_file`; None when neither does (a run or checkpoint)."""
    path = Path(path)
    return next((d for d in (path, path / "pipeline") if (d / network_file).is_file()), None)


def check_complete(path: Path, files: tuple[str, ...]) -> None:
    """A CheckpointError naming the `files` that the folder lacks."""
    missing = [name for name in files if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"{path} is not a complete pipeline directory: missing {', '.join(missing)}")


def load_parts(path: Path, parts: dict[str, nn.Module]) -> None:
    """Strictly load each module from its weights file in the folder."""
    for file, module in parts.items():
        load_into(module, load_weights(path / file), f"{path}/{file}")


def write_pipeline_folder(path: "str | Path", cfg: ExperimentConfig, parts: dict[str, nn.Module],
                          tokenizer: nn.Module | None = None) -> Path:
    """config.yaml, each part's weights file and, when given, tokenizer/ (then the config points at it)."""
    cfg = copy.deepcopy(cfg)
    with atomic_directory(path) as tmp:
        if tokenizer is not None:
            cfg.tokenizer.path = TOKENIZER_DIR  # relative to the pipeline directory
            save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        save_config(cfg, tmp / CONFIG_FILE)
        for file, module in parts.items():
            save_weights(module.state_dict(), tmp / file)
    return Path(path)


def saved_config(path: "str | Path") -> ExperimentConfig:
    """The config of a pipeline folder (or a run's `pipeline/`), else of a checkpoint or a run's latest one."""
    path = Path(path)
    saved = next((d for d in (path, path / "pipeline") if (d / CONFIG_FILE).is_file()), None)
    return read_config(saved if saved is not None else resolve_checkpoint(path))
