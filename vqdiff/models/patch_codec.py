"""Patch-local halves of the Gumbel VQ-VAE (`encoder: patch`, `decoder: patch`): each token's code depends on its
own f x f pixel patch only, and each code draws only its own patch."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PatchEncoder(nn.Module):
    """Images [B, in_channels, H, W] -> features [B, z_channels, H/f, W/f] where each output position sees only its
    own f x f pixel patch: a strided f x f convolution, then residual 1x1 blocks (no normalisation across
    positions, no attention). A patch then always gets the same code wherever it lies and whatever surrounds it,
    which the taming encoder (group norm, attention, wide receptive field) does not give: on the shapes data its
    blank patches took 444 different codes that carried the objects' whereabouts (README, Tokenizer)."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        f, width = 2 ** (len(ch_mult) - 1), ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, width, f, stride=f)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(),
                                                  nn.Conv2d(width, width, 1)) for _ in range(num_res_blocks))
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))


class PatchDecoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, out_channels, h*f, w*f] where each f x f pixel patch is a function
    of its own latent only: residual 1x1 blocks, then a stride-f transposed convolution. With a PatchEncoder the
    tokenizer becomes a learned codebook of f x f patches; a code then means the same pixels wherever it is used,
    so codes seen in one colour-shape pair can be reused for another (README, Tokenizer)."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int):
        super().__init__()
        f, width = 2 ** (len(ch_mult) - 1), ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(),
                                                  nn.Conv2d(width, width, 1)) for _ in range(num_res_blocks))
        self.conv_out = nn.ConvTranspose2d(width, out_channels, f, stride=f)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))
