"""The VQ-GAN image tokenizer of Improved VQ-Diffusion (ITHQ's `PatchVQGAN`): taming's Encoder and Decoder around a
codebook searched by euclidean nearest neighbour.

The released codebook was trained by EMA updates; inference only looks codes up, so only the codebook itself is kept.
Parameter names follow the released files (`encoder.*`, `quant_conv`, `quantize.embedding` [K, D] (a buffer),
`post_quant_conv`, `decoder.*`), so they load by name (vqdiff/interop/official.py).
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .taming_blocks import Decoder, Encoder
from .vqvae import ImageCodec, nearest_ids

# ITHQ (ithq_vqvae.pth): 256 px -> 32x32 tokens over 4096 codes of dimension 128.
ITHQ_CONFIG = dict(
    resolution=256, in_channels=3, out_channels=3, ch=64, ch_mult=[1, 2, 4, 8], num_res_blocks=2,
    attn_resolutions=[32], z_channels=256, dropout=0.0, norm_groups=32, embedding_dim=128, num_embeddings=4096,
)


class NearestQuantizer(nn.Module):
    """A fixed codebook `embedding` [K, D]; each latent takes the code at the smallest euclidean distance."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("embedding", torch.randn(num_embeddings, embedding_dim))

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, D, h, w] -> code ids [B, h, w]."""
        return nearest_ids(z, self.embedding)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding).permute(0, 3, 1, 2)  # [B, D, h, w]


class PatchVQGAN(ImageCodec):
    """Encoder -> quant_conv -> NearestQuantizer -> post_quant_conv -> Decoder.

    Images are float [B, 3, H, W] in [-1, 1] with H, W divisible by `downsample_factor`; tokens are int64
    [B, h, w] in [0, num_embeddings)."""

    def __init__(self, *, resolution: int = 256, in_channels: int = 3, out_channels: int = 3, ch: int = 64,
                 ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (32,), z_channels: int = 256, dropout: float = 0.0,
                 norm_groups: int = 32, embedding_dim: int = 128, num_embeddings: int = 4096):
        super().__init__()
        self.config = dict(
            resolution=resolution, in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), z_channels=z_channels,
            dropout=dropout, norm_groups=norm_groups, embedding_dim=embedding_dim, num_embeddings=num_embeddings,
        )
        levels = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      z_channels=z_channels, dropout=dropout, resolution=resolution, norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=in_channels, **levels)
        self.decoder = Decoder(out_channels=out_channels, **levels)
        self.quant_conv = nn.Conv2d(z_channels, embedding_dim, 1)
        self.quantize = NearestQuantizer(num_embeddings, embedding_dim)
        self.post_quant_conv = nn.Conv2d(embedding_dim, z_channels, 1)

    @classmethod
    def from_config(cls, config: Mapping) -> "PatchVQGAN":
        unknown = sorted(set(config) - set(ITHQ_CONFIG))
        if unknown:
            raise ValueError(f"unknown PatchVQGAN config keys: {unknown}")
        return cls(**config)

    @property
    def num_embeddings(self) -> int:
        return self.quantize.embedding.shape[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> token ids [B, H/f, W/f] (int64), the nearest code per position."""
        self.check_images(images)
        return self.quantize.ids(self.quant_conv(self.encoder(images)))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> their codebook embeddings [B, embedding_dim, h, w]."""
        return self.quantize.embed_ids(tokens)
