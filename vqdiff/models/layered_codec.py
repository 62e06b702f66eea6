"""Layered halves of the Gumbel VQ-VAE (`encoder: layered`, `decoder: layered`): a token is an (outline, colour) pair.

A drawing of flat colours on a white canvas is, per pixel, white * (1 - alpha) + colour * alpha. The layered
tokenizer codes the two parts apart: the outline factor sees only the ink density (colour-blind) and decodes only
alpha at full resolution; the colour factor sees only its own f x f patch and decodes only that patch's RGB. A
code then cannot hold a colour-shape pair, so a pair never seen in training still has its code (the outline seen
in other colours, the colour seen in other outlines): the codes compose by construction. The quantizer is the
product codebook of `SplitGumbelQuantizer`; images not of this kind (photographs) are outside what it can draw.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def ink_density(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> colour-blind ink [B, 1, H, W] in [-1, 1]: 1 - min(R, G, B), divided by
    the image's most inked pixel (at least 0.5), so full coverage reads 1 whatever the colour (the palette's
    colours reach 0.76-0.88 alone)."""
    ink = (1 - images.min(dim=1, keepdim=True).values) / 2  # [0, 1]; white = 0
    peak = ink.amax(dim=(2, 3), keepdim=True).clamp_min(0.5)
    return (ink / peak).clamp(0, 1) * 2 - 1


class LayeredEncoder(nn.Module):
    """Images -> features [B, z_channels, h, w]: the first `outline_channels` from the ink density through
    `outline` (a taming Encoder with one input channel), the rest from each f x f patch alone (strided conv)."""

    def __init__(self, outline: nn.Module, outline_channels: int, z_channels: int, f: int, width: int = 64):
        super().__init__()
        self.outline = outline
        self.outline_channels = outline_channels
        self.colour = nn.Sequential(nn.Conv2d(3, width, f, stride=f), nn.SiLU(), nn.Conv2d(width, width, 1),
                                    nn.SiLU(), nn.Conv2d(width, z_channels - outline_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.outline(ink_density(x)), self.colour(x)], 1)


class LayeredDecoder(nn.Module):
    """Code embeddings [B, D, h, w] (first `outline_dim` channels the outline factor's, the rest the colour's) ->
    images [B, 3, H, W]: white + alpha * (colour - white), alpha = sigmoid(outline decoder) at full resolution,
    colour = a 1x1 MLP of the colour embedding, constant over its f x f patch."""

    def __init__(self, outline: nn.Module, outline_dim: int, embedding_dim: int, f: int, width: int = 64):
        super().__init__()
        self.outline = outline
        self.outline_dim = outline_dim
        self.f = f
        self.colour = nn.Sequential(nn.Conv2d(embedding_dim - outline_dim, width, 1), nn.SiLU(),
                                    nn.Conv2d(width, 3, 1))

    @property
    def conv_out(self) -> nn.Module:
        return self.outline.conv_out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.outline(z[:, :self.outline_dim]))  # [B, 1, H, W]
        colour = F.interpolate(self.colour(z[:, self.outline_dim:]), scale_factor=self.f, mode="nearest")
        return 1 + alpha * (colour - 1)  # white is +1


def outline_channels(total: int) -> int:
    """The outline's share of a latent's channels (the colour takes the rest): three quarters, as it has the
    harder job."""
    return max(1, (3 * total) // 4)


def check_layered(encoder: str, decoder: str, factors: Sequence[int] | None, out_channels: int) -> None:
    layered = (encoder == "layered", decoder == "layered")
    if any(layered) and not all(layered):
        raise ValueError(f"encoder and decoder must both be 'layered' or neither, got {encoder!r} and {decoder!r}")
    if all(layered) and factors is None:
        raise ValueError("a layered tokenizer needs factors [outline codes, colour codes] (vqvae.factors)")
    if all(layered) and out_channels != 3:
        raise ValueError(f"a layered tokenizer draws RGB images, got out_channels={out_channels}")
