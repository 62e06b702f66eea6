"""Writing a token cache (the format is data/tokens.py's): a data set encoded once by a trained tokenizer."""

from pathlib import Path

import torch

from ..data.tokens import tokenizer_hash, write_tokens
from .tokenizer import load_tokenizer


def encode_token_cache(tokenizer_dir: "str | Path", dataset, out_dir: "str | Path", batch_size: int = 64,
                       device: str = "cpu", num_workers: int = 0, progress: bool = True) -> Path:
    """Encode `dataset` with the tokenizer in `tokenizer_dir` (argmax codes) into a token cache at `out_dir`."""
    tokenizer = load_tokenizer(tokenizer_dir, device)

    @torch.inference_mode()
    def encode(images: torch.Tensor) -> torch.Tensor:
        return tokenizer.encode(images.to(device))

    return write_tokens(dataset, encode, out_dir, num_classes=tokenizer.num_embeddings,
                        tokenizer=tokenizer_hash(tokenizer_dir), batch_size=batch_size, num_workers=num_workers,
                        progress=progress)
