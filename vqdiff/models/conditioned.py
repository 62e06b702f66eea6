"""A denoising network together with the text encoder that feeds it, as one module.

Training runs the text encoder inside the network call (`model(x_t, t, captions=[...])`), so a
jointly trained encoder gets its gradients through DDP like any other layer. Sampling passes
precomputed features instead (`text=`, `text_mask=`, or the transformer's cached `text_kv=`).
"""

from collections.abc import Sequence

import torch
from torch import nn


class TextConditioned(nn.Module):
    def __init__(self, network: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.network = network
        self.text_encoder = text_encoder

    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, L, D], mask [B, L]); a frozen encoder reuses features of captions it has seen."""
        if self.text_encoder.trainable:
            return self.text_encoder(captions)
        return self.text_encoder.encode_cached(captions)

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: Sequence[str] | None = None, **cond):
        if captions is not None:
            cond["text"], cond["text_mask"] = self.encode_text(captions)
        return self.network(x, t, **cond)
