"""Gumbel-softmax VQ-VAE image tokenizer (the taming-transformers "Gumbel f8" VQGAN that VQ-Diffusion uses).

Parameter names follow taming-transformers one-to-one (`encoder.down.{i}.block.{j}.conv1`, `decoder.up.{i}.attn.{j}.q`,
`quantize.proj`, `quantize.embed`, `quant_conv`, `post_quant_conv`), so released weights load by name
(see vqdiff/interop/taming.py). A trimmed tokenizer adds one int64 buffer `code_map` [K'] (trimmed id -> full code).
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .gumbel import FactoredGumbelQuantizer, GumbelQuantizer, SplitGumbelQuantizer
from .layered_codec import LayeredDecoder, LayeredEncoder, check_layered, outline_channels
from .patch_codec import PatchDecoder, PatchEncoder
from .taming_blocks import Decoder, Encoder

# The published Gumbel f8 architecture (taming configs, VQ-Diffusion COCO/CUB/CC): 256 px -> 32x32 tokens.
GUMBEL_F8_CONFIG = dict(
    resolution=256, in_channels=3, out_channels=3, ch=128, ch_mult=[1, 1, 2, 4], num_res_blocks=2,
    attn_resolutions=[32], z_channels=256, dropout=0.0, norm_groups=32, embedding_dim=256,
    num_embeddings=8192, straight_through=True, kl_weight=1e-8, temperature=1.0, num_kept_codes=None,
    encoder="taming", decoder="taming", factors=None,
)
ENCODER_TYPES = ("taming", "patch", "layered")
DECODER_TYPES = ("taming", "patch", "layered")


def batch_images(batch, key: str) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch[key]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def nearest_ids(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Latents [B, D, h, w] -> ids [B, h, w] of the nearest rows of `codebook` [K, D] (Euclidean)."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [BHW, D]
    # |z|^2 + |e|^2 - 2 z.e, the released ITHQ expression, so that near ties fall the same way
    distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return distance.argmin(1).view(b, h, w)


class ImageCodec(nn.Module):
    """What both tokenizers (GumbelVQVAE, PatchVQGAN) share: image checks, the code-embedding latents and
    decoding token ids through them. A subclass sets `config` (in_channels, ch_mult), `decoder` and
    `post_quant_conv`, and defines `num_embeddings`, `encode` and `embed_tokens`."""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config["in_channels"]:
            raise ValueError(f"images must be [B, {self.config['in_channels']}, H, W], got {list(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {list(images.shape[2:])} is not divisible by the downsample factor {f}")

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, h*f, w*f] clamped to [-1, 1]."""
        if tokens.dim() != 3 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor [B, h, w], got {tokens.dtype} {list(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_embeddings):
            raise ValueError(f"token ids must lie in [0, {self.num_embeddings}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return self.decode_latents(self.embed_tokens(tokens.long()))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the continuous latents of Gaussian latent diffusion: [B, embedding_dim, h, w].

        These are the embeddings of the codes `encode` picks (Gumbel: argmax; PatchVQGAN: nearest), not the
        pre-quantisation features (a Gumbel tokenizer's decoder is fine-tuned on argmax codes), so
        `decode_latents` of these gives exactly `decode(encode(images))`; they also follow from a token cache."""
        return self.embed_tokens(self.encode(images))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latents [B, embedding_dim, h, w] -> images [B, C, h*f, w*f] clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)

    def nearest_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latents [B, embedding_dim, h, w] -> the ids [B, h, w] of the nearest code embeddings
        (Euclidean): how latent diffusion decodes the samples of a VQ autoencoder (Rombach et al. 2022)."""
        codebook = self.embed_tokens(torch.arange(self.num_embeddings, device=z.device)[None, None])[0, :, 0]  # [D, K]
        return nearest_ids(z.to(codebook.dtype), codebook.t())


class GumbelVQVAE(ImageCodec):
    """Encoder -> quant_conv -> GumbelQuantizer -> post_quant_conv -> Decoder.

    Images are float [B, 3, H, W] in [-1, 1] with H, W divisible by `downsample_factor`; tokens are int64 [B, h, w]
    in [0, num_embeddings). `trim` gives a tokenizer over the used codes only (`num_kept_codes` in the config).
    `encoder="patch"` swaps the taming encoder for a PatchEncoder (codes of f x f patches, independent of the rest),
    `decoder="patch"` the taming decoder for a PatchDecoder (each code decodes to its own f x f patch)."""

    def __init__(self, *, resolution: int = 256, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (32,),
                 z_channels: int = 256, dropout: float = 0.0, norm_groups: int = 32, embedding_dim: int = 256,
                 num_embeddings: int = 8192, straight_through: bool = True, kl_weight: float = 1e-8,
                 temperature: float = 1.0, num_kept_codes: int | None = None, encoder: str = "taming",
                 decoder: str = "taming", factors: Sequence[int] | None = None):
        super().__init__()
        if encoder not in ENCODER_TYPES:
            raise ValueError(f"encoder must be one of {list(ENCODER_TYPES)}, got {encoder!r}")
        if decoder not in DECODER_TYPES:
            raise ValueError(f"decoder must be one of {list(DECODER_TYPES)}, got {decoder!r}")
        self.config = dict(
            resolution=resolution, in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), z_channels=z_channels,
            dropout=dropout, norm_groups=norm_groups, embedding_dim=embedding_dim, num_embeddings=num_embeddings,
            straight_through=straight_through, kl_weight=kl_weight, temperature=temperature,
            num_kept_codes=num_kept_codes, encoder=encoder, decoder=decoder,
            factors=None if factors is None else list(factors),
        )
        if factors is not None and (len(factors) != 2 or factors[0] * factors[1] != num_embeddings):
            raise ValueError(f"factors must be two numbers whose product is num_embeddings={num_embeddings}, "
                             f"got {factors}")
        for width in [ch * m for m in ch_mult]:
            if width % norm_groups:
                raise ValueError(f"channel width {width} (ch * ch_mult) is not divisible by norm_groups={norm_groups}")
        levels = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      z_channels=z_channels, dropout=dropout, resolution=resolution, norm_groups=norm_groups)
        check_layered(encoder, decoder, factors, out_channels)
        f = 2 ** (len(ch_mult) - 1)
        quantizer = dict(straight_through=straight_through, kl_weight=kl_weight, temperature=temperature)
        if encoder == "layered":
            # the 1x1 convs around the quantizer would mix the two factors' channels: identities instead
            hidden_split, embed_split = outline_channels(z_channels), outline_channels(embedding_dim)
            outline = Encoder(in_channels=1, **{**levels, "z_channels": hidden_split})
            self.encoder = LayeredEncoder(outline, hidden_split, z_channels, f)
            self.decoder = LayeredDecoder(Decoder(out_channels=1, **{**levels, "z_channels": embed_split}),
                                          embed_split, embedding_dim, f)
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
            self.quantize = SplitGumbelQuantizer(z_channels, embedding_dim, tuple(factors), hidden_split,
                                                 embed_split, **quantizer)
            self.register_code_map(num_kept_codes, num_embeddings)
            return
        if encoder == "patch":
            self.encoder = PatchEncoder(in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                                        num_res_blocks=num_res_blocks, z_channels=z_channels)
        else:
            self.encoder = Encoder(in_channels=in_channels, **levels)
        if decoder == "patch":
            self.decoder = PatchDecoder(out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                                        num_res_blocks=num_res_blocks, z_channels=z_channels)
        else:
            self.decoder = Decoder(out_channels=out_channels, **levels)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        if factors is None:
            self.quantize = GumbelQuantizer(z_channels, embedding_dim, num_embeddings, **quantizer)
        else:
            self.quantize = FactoredGumbelQuantizer(z_channels, embedding_dim, tuple(factors), **quantizer)
        self.post_quant_conv = nn.Conv2d(embedding_dim, z_channels, 1)
        self.register_code_map(num_kept_codes, num_embeddings)

    def register_code_map(self, num_kept_codes: int | None, num_embeddings: int) -> None:
        if num_kept_codes is not None:
            if not 1 <= num_kept_codes <= num_embeddings:
                raise ValueError(f"num_kept_codes must lie in [1, {num_embeddings}], got {num_kept_codes}")
            self.register_buffer("code_map", torch.arange(num_kept_codes))
        else:
            self.code_map = None

    @classmethod
    def from_config(cls, config: Mapping) -> "GumbelVQVAE":
        unknown = sorted(set(config) - set(GUMBEL_F8_CONFIG))
        if unknown:
            raise ValueError(f"unknown GumbelVQVAE config keys: {unknown}")
        return cls(**config)

    @property
    def num_embeddings(self) -> int:
        """The number of token ids: K' after trimming, else the full codebook size."""
        return self.quantize.num_embeddings if self.code_map is None else self.code_map.numel()

    @property
    def codebook_size(self) -> int:
        """The full codebook size K (before trimming)."""
        return self.quantize.num_embeddings

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def forward(self, images: torch.Tensor, temperature: float | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training pass: dict(recon [B, C, H, W] unclamped, logits [B, K', h, w], kl, kl_loss, tokens [B, h, w])."""
        self.check_images(images)
        restarts = isinstance(self.quantize, SplitGumbelQuantizer) and self.quantize.training and self.code_map is None
        if restarts:
            self.quantize.restart_unused()  # before the weights are used, so autograd sees no in-place change
        z = self.quant_conv(self.encoder(images))
        out = self.quantize(z, temperature, self.code_map, generator)
        recon = self.decoder(self.post_quant_conv(out.pop("z_q")))
        if restarts:
            f = self.downsample_factor
            self.quantize.observe(out["tokens"], F.avg_pool2d((recon.detach() - images).pow(2).mean(1), f))
        return dict(recon=recon, **out)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> token ids [B, H/f, W/f] (int64): the argmax code, or a sample with `sample`."""
        self.check_images(images)
        z = self.quant_conv(self.encoder(images))
        return self.quantize.sample_ids(z, sample, self.code_map, generator)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> their codebook embeddings [B, embedding_dim, h, w]."""
        return self.quantize.embed_ids(tokens, self.code_map)

    def full_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> full codebook codes (the identity when untrimmed)."""
        return tokens if self.code_map is None else self.code_map[tokens]

    @torch.inference_mode()
    def codebook_usage(self, batches: Iterable, key: str = "image", sample: bool = False,
                       generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
        """How often each full code is chosen over a dataloader or any iterable of image batches
        (tensors, (images, ...) tuples or dicts holding `key`): int64 counts [codebook_size] on the CPU."""
        device = next(self.parameters()).device
        counts = torch.zeros(self.codebook_size, dtype=torch.long, device=device)
        for batch in tqdm(batches, desc="codebook usage", disable=not progress):
            tokens = self.encode(batch_images(batch, key).to(device), sample=sample, generator=generator)
            counts += torch.bincount(self.full_codes(tokens).flatten(), minlength=self.codebook_size)
        return counts.cpu()

    def trim(self, counts: torch.Tensor, min_count: int = 1) -> "GumbelVQVAE":
        """A tokenizer whose ids 0..K'-1 are the full codes used at least `min_count` times, in increasing order."""
        if counts.shape != (self.codebook_size,):
            raise ValueError(f"counts must have shape [{self.codebook_size}], got {list(counts.shape)}")
        kept = torch.nonzero(counts.cpu() >= min_count).flatten()
        if kept.numel() == 0:
            raise ValueError(f"no code is used at least min_count={min_count} times")
        return self.keep_codes(kept)

    def keep_codes(self, codes: torch.Tensor) -> "GumbelVQVAE":
        """A tokenizer whose token id i is full code `codes[i]` (distinct codes in [0, codebook_size))."""
        codes = torch.as_tensor(codes, dtype=torch.long).flatten().cpu()
        if codes.numel() == 0 or codes.unique().numel() != codes.numel():
            raise ValueError("codes must be a non-empty list of distinct full codes")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        if self.code_map is not None and not torch.isin(codes, self.code_map.cpu()).all():
            raise ValueError("codes must be a subset of this trimmed tokenizer's kept codes")
        weight = next(self.parameters())
        trimmed = GumbelVQVAE.from_config({**self.config, "num_kept_codes": codes.numel()})
        state = {k: v for k, v in self.state_dict().items() if k != "code_map"}
        state["code_map"] = codes
        trimmed.load_state_dict(state)
        return trimmed.to(device=weight.device, dtype=weight.dtype).train(self.training)
