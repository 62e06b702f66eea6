"""The DDPM UNet (Ho et al. 2020, appendix B), as written in openai/improved-diffusion (Nichol & Dhariwal 2021).

A stack of GroupNorm + SiLU residual blocks that receive a time embedding, self-attention at chosen
resolutions, strided-conv downsampling and nearest + conv upsampling, with skip connections between
the two halves. Optional conditioning: class labels (an embedding added to the time embedding) and
per-token text features (GLIDE-style: projected text keys/values join the image keys/values of each
attention block, with a padding mask), with a learned null caption and caption dropping for classifier-free
guidance as in the DiffusionTransformer. The defaults are the 35.7M-parameter CIFAR-10 model of Ho et al.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import attention, drop_text, timestep_embedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018, as DDPM); fewer when `channels` is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the residual branch it ends starts as the identity (improved-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """norm-SiLU-conv, add the time embedding, norm-SiLU-dropout-conv, plus a (1x1 conv) skip.

    `use_scale_shift_norm` conditions the second norm as `norm(h) * (1 + scale) + shift` (Nichol & Dhariwal
    2021) instead of adding the embedding. `resample` = "up" / "down" resamples inside the block (BigGAN
    style, used when `resblock_updown`): no learned weights, on both branches.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 use_scale_shift_norm: bool = False, resample: str | None = None):
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))  # [B, C_in, H, W]
        h = self.conv1(self._resample(h))  # [B, C_out, H', W']
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # [B, C_out or 2 C_out, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, optionally also attending to text tokens.

    With `context_dim`, text features [B, L, D] are projected to keys/values and appended to the image
    keys/values (GLIDE, Nichol et al. 2022); `text_mask` [B, L] (True = real token) hides padding. The
    image keys are always visible, so a row whose tokens are all masked is plain self-attention: it gets
    the same output as `text=None` (no NaN), which makes an all-False mask a natural null condition.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.text_kv = nn.Linear(context_dim, 2 * channels) if context_dim is not None else None
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape  # [B, C, N] -> [B, heads, N, C / heads]
        return x.reshape(b, self.num_heads, c // self.num_heads, n).transpose(2, 3)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(b, c, -1)).chunk(3, dim=1)  # 3 x [B, C, HW]
        mask = None
        if text is not None and self.text_kv is not None:
            text_k, text_v = self.text_kv(text).transpose(1, 2).chunk(2, dim=1)  # 2 x [B, C, L]
            k = torch.cat([k, text_k], dim=2)
            v = torch.cat([v, text_v], dim=2)
            if text_mask is not None:
                image_visible = text_mask.new_ones(b, height * width)
                mask = torch.cat([image_visible, text_mask], dim=1)[:, None, None, :]  # [B, 1, 1, HW + L]
        h = attention(self._heads(q), self._heads(k), self._heads(v), mask)
        h = h.transpose(2, 3).reshape(b, c, -1)  # [B, C, HW]
        return x + self.proj_out(h).reshape(b, c, height, width)


class UNet(nn.Module):
    """The DDPM / improved-diffusion UNet: `model(x, t, y=None, text=None, text_mask=None) -> [B, out, H, W]`.

    x: [B, in_channels, H, W] with H, W divisible by 2 ** (len(ch_mult) - 1); `image_size` only places the
    attention blocks (at the feature resolutions listed in `attn_resolutions`). t: [B] integer or float
    timesteps. y: [B] class labels in [0, num_classes]; the extra label `num_classes` (= `null_class`) is
    the learned "no label" embedding for classifier-free guidance, and y=None means the null label for every
    row. text: [B, L, context_dim] per-token features, text_mask: [B, L] bool, True on real tokens.
    `learn_sigma` doubles the output channels (epsilon and the variance interpolation v, Nichol & Dhariwal).
    `num_head_channels`, when set, overrides `num_heads` with channels // num_head_channels heads.
    `text_length` adds a learned null caption [text_length, context_dim] (`null_text`); in training each caption
    is swapped for it with probability `text_drop_prob`. It starts at `null_text_std` per element (default
    1/sqrt(context_dim), the scale of L2-normalised features; 1.0 for raw layer-norm outputs).
    `position_embedding` adds a learned embedding [ch, image_size, image_size] (zeros at first) after the input
    convolution: the absolute place, for captions that name one ("at the top left").
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), attn_resolutions: tuple[int, ...] = (16,),
                 num_res_blocks: int = 2, dropout: float = 0.1, image_size: int = 32, learn_sigma: bool = False,
                 num_classes: int | None = None, context_dim: int | None = None, num_heads: int = 1,
                 num_head_channels: int | None = None, resblock_updown: bool = False,
                 use_scale_shift_norm: bool = False, grad_checkpointing: bool = False,
                 text_length: int | None = None, text_drop_prob: float = 0.0, null_text_std: float | None = None,
                 position_embedding: bool = False):
        super().__init__()
        if text_length is not None and context_dim is None:
            raise ValueError("text_length (a null caption) needs text conditioning (context_dim)")
        if not 0.0 <= text_drop_prob < 1.0 or (text_drop_prob > 0 and text_length is None):
            raise ValueError(f"text_drop_prob must be in [0, 1) and needs text_length (the null caption), "
                             f"got {text_drop_prob} with text_length={text_length}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} not divisible by 2 ** (len(ch_mult) - 1) = "
                             f"{2 ** (len(ch_mult) - 1)}")
        self.in_channels = in_channels
        self.out_channels = out_channels * (2 if learn_sigma else 1)
        self.ch = ch
        self.num_levels = len(ch_mult)
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.text_drop_prob = text_drop_prob
        self.grad_checkpointing = grad_checkpointing
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        def res(c_in, c_out, resample=None):
            return ResBlock(c_in, c_out, emb_dim, dropout, use_scale_shift_norm, resample)

        def attn(c):
            heads = c // num_head_channels if num_head_channels is not None else num_heads
            return AttentionBlock(c, heads, context_dim)

        def down(c):
            return res(c, c, "down") if resblock_updown else Downsample(c)

        def up(c):
            return res(c, c, "up") if resblock_updown else Upsample(c)

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # convolutions and attention see no absolute place but through the zero padding at the borders
        self.pos_embed = nn.Parameter(torch.zeros(1, ch, image_size, image_size)) if position_embedding else None
        self.down_blocks = nn.ModuleList()
        skip_channels = [ch]
        c, resolution = ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers = [res(c, mult * ch)]
                c = mult * ch
                if resolution in attn_resolutions:
                    layers.append(attn(c))
                self.down_blocks.append(nn.ModuleList(layers))
                skip_channels.append(c)
            if level != len(ch_mult) - 1:
                self.down_blocks.append(nn.ModuleList([down(c)]))
                skip_channels.append(c)
                resolution //= 2
        self.middle = nn.ModuleList([res(c, c), attn(c), res(c, c)])
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(c + skip_channels.pop(), mult * ch)]
                c = mult * ch
                if resolution in attn_resolutions:
                    layers.append(attn(c))
                if level and i == num_res_blocks:
                    layers.append(up(c))
                    resolution *= 2
                self.up_blocks.append(nn.ModuleList(layers))
        self.norm_out = group_norm(c)
        self.conv_out = zero_module(nn.Conv2d(c, self.out_channels, 3, padding=1))
        if text_length is not None:
            std = context_dim ** -0.5 if null_text_std is None else null_text_std
            self.null_text_embed = nn.Parameter(torch.randn(text_length, context_dim) * std)
        else:
            self.register_parameter("null_text_embed", None)

    @property
    def null_class(self) -> int:
        """The label index meaning "no class" (classifier-free guidance's null condition)."""
        if self.num_classes is None:
            raise ValueError("this UNet has no class conditioning (num_classes=None)")
        return self.num_classes

    def null_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned unconditional caption: features [B, L, context_dim] and an all-True mask [B, L]."""
        if self.null_text_embed is None:
            raise ValueError("this UNet has no null caption (text_length=None)")
        text = self.null_text_embed[None].expand(batch_size, -1, -1)
        return text, torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)

    def _embedding(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must have shape [B] = [{batch}], got {list(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.ch))  # [B, 4 ch]
        if y is not None and self.label_embed is None:
            raise ValueError("got class labels y but the UNet was built with num_classes=None")
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
            if y.shape != (batch,) or y.min() < 0 or y.max() > self.num_classes:
                raise ValueError(f"y must be [B] = [{batch}] labels in [0, {self.num_classes}] "
                                 f"({self.num_classes} = null class), got shape {list(y.shape)}")
            emb = emb + self.label_embed(y)
        return emb

    def _check_text(self, text: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int):
        if text is None:
            if text_mask is not None:
                raise ValueError("text_mask given without text")
            return
        if self.context_dim is None:
            raise ValueError("got text features but the UNet was built with context_dim=None")
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.context_dim:
            raise ValueError(f"text must be [B, L, context_dim] = [{batch}, L, {self.context_dim}], "
                             f"got {list(text.shape)}")
        if text_mask is not None and (text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]):
            raise ValueError(f"text_mask must be a bool tensor of shape {list(text.shape[:2])}, "
                             f"got {text_mask.dtype} {list(text_mask.shape)}")

    def _layer(self, layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, text, text_mask) -> torch.Tensor:
        if isinstance(layer, ResBlock):
            args = (h, emb)
        elif isinstance(layer, AttentionBlock):
            args = (h, text, text_mask)
        else:
            return layer(h)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, height, width = x.shape
        factor = 2 ** (self.num_levels - 1)
        if c != self.in_channels or height % factor or width % factor:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] with H, W divisible by {factor}, "
                             f"got {list(x.shape)}")
        emb = self._embedding(t, y, b)
        self._check_text(text, text_mask, b)
        if self.training and self.text_drop_prob > 0 and text is not None:
            if text.shape[1] != self.null_text_embed.shape[0]:
                raise ValueError(f"caption dropping needs text of length {self.null_text_embed.shape[0]}, "
                                 f"got {text.shape[1]}")
            text, text_mask = drop_text(text, text_mask, self.null_text_embed, self.text_drop_prob)
        h = self.conv_in(x)
        if self.pos_embed is not None:
            if h.shape[2:] != self.pos_embed.shape[2:]:
                raise ValueError(f"a UNet with a position embedding takes {list(self.pos_embed.shape[2:])} images, "
                                 f"got {list(x.shape[2:])}")
            h = h + self.pos_embed
        skips = [h]
        for block in self.down_blocks:
            for layer in block:
                h = self._layer(layer, h, emb, text, text_mask)
            skips.append(h)
        for layer in self.middle:
            h = self._layer(layer, h, emb, text, text_mask)
        for block in self.up_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = self._layer(layer, h, emb, text, text_mask)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]


def unet_preset(name: str) -> dict:
    """Keyword arguments of named UNet sizes: `UNet(**unet_preset("tiny_mnist"))`.

    "ddpm_cifar10": Ho et al.'s 35.7M CIFAR-10 model. The small ones train in minutes on a CPU:
    "tiny_mnist" (1 x 28 x 28), "tiny_cifar10" (3 x 32 x 32), "tiny_64" (3 x 64 x 64).
    """
    presets = {
        "ddpm_cifar10": dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,),
                             num_res_blocks=2, dropout=0.1, image_size=32),
        "tiny_mnist": dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), attn_resolutions=(14,),
                           num_res_blocks=1, dropout=0.0, image_size=28),
        "tiny_cifar10": dict(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), attn_resolutions=(16,),
                             num_res_blocks=1, dropout=0.0, image_size=32),
        "tiny_64": dict(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(16,),
                        num_res_blocks=1, dropout=0.0, image_size=64),
    }
    if name not in presets:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]
