"""PatchGAN discriminator (Isola et al. 2017), as taming-transformers' NLayerDiscriminator."""

import enum
import math

import torch
from torch import nn


class DiscriminatorNorm(str, enum.Enum):
    BATCH = "batch"
    GROUP = "group"


def norm_layer(norm: DiscriminatorNorm, channels: int) -> nn.Module:
    if norm is DiscriminatorNorm.BATCH:
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """Images [B, C, H, W] -> real/fake logits [B, 1, H', W'], one per overlapping patch (70x70 px for 3 layers).

    Stride-2 4x4 convs double the width per layer up to 8x `channels`; normalised convs carry no bias. BatchNorm
    (taming's default) needs SyncBatchNorm under data parallel; GroupNorm does not."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3,
                 norm: DiscriminatorNorm | str = DiscriminatorNorm.BATCH):
        super().__init__()
        norm = DiscriminatorNorm(norm)
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), norm_layer(norm, out),
                       nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN initialisation (taming's weights_init): conv N(0, 0.02), norm scale N(1, 0.02), shift 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)
