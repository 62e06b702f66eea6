"""Building blocks shared by the networks."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..options import Activation, TimeEmbedding

SINUSOID_RESCALE = 4000.0  # the official sinusoidal AdaLN maps t in [0, T) to [0, 4000) first


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[B, dim]` of (possibly fractional) timesteps `[B]` (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, run in float32 for bfloat16 inputs on the CPU: there the bfloat16 kernel's
    forward + backward takes 3-4x the float32 time (torch 2.14 on AVX-512 BF16, heads [32, 8, 64, 32]: 32 vs 11 ms)."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cpu_autocast_attention(device: torch.device):
    """For attention this package does not call (open_clip's text tower): under bfloat16 autocast on the CPU,
    the math kernel, whose bfloat16 backward is 2-3x faster than the flash kernel's."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AdaLayerNorm(nn.Module):
    """y = LayerNorm(x) * (1 + scale(t)) + shift(t), with [scale, shift] = linear(SiLU(emb(t))).

    `emb` is a learned table [num_steps, dim] or a fixed sinusoid; the layer norm has no affine terms
    of its own. Parameter names and the scale-then-shift chunk order follow the released models.
    """

    def __init__(self, dim: int, num_steps: int, time_embedding: TimeEmbedding | str = TimeEmbedding.TABLE):
        super().__init__()
        self.time_embedding = TimeEmbedding(time_embedding)
        self.dim, self.num_steps = dim, num_steps
        if self.time_embedding is TimeEmbedding.TABLE:
            self.emb = nn.Embedding(num_steps, dim)
        self.linear = nn.Linear(dim, 2 * dim)

    def step_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """[B] integer steps -> [B, dim]."""
        if self.time_embedding is TimeEmbedding.TABLE:
            return self.emb(t)
        return timestep_embedding(t * (SINUSOID_RESCALE / self.num_steps), self.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(self.step_embedding(t)))[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        return torch.addcmul(shift, F.layer_norm(x, (self.dim,), eps=1e-5), 1 + scale)  # one pass for * and +


class Attention(nn.Module):
    """Multi-head attention through F.scaled_dot_product_attention.

    Self-attention when `context_dim` is None; otherwise queries come from x [B, N, dim] and keys and
    values from a context [B, L, context_dim] (cross-attention). Separate `query`/`key`/`value`/`proj`
    Linear layers with bias, as in the released models.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim or dim, dim)
        self.value = nn.Linear(context_dim or dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] -> [B, H, L, dim / H]."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def key_value(self, context: torch.Tensor) -> torch.Tensor:
        """Keys and values of a context [B, L, context_dim] -> [B, 2, H, L, dim / H]."""
        return torch.stack([self.split_heads(self.key(context)), self.split_heads(self.value(context))], dim=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, dim]; keys/values from `key_value` if given, else from `context` (default x).

        `mask` [B, 1, 1, L] bool, True where a key may be attended.
        """
        if key_value is not None:
            k, v = key_value.unbind(1)
        else:
            context = x if context is None else context
            k, v = self.split_heads(self.key(context)), self.split_heads(self.value(context))
        q = self.split_heads(self.query(x))  # [B, H, N, dim / H]
        out = attention(q, k, v, mask)  # [B, H, N, dim / H]
        return self.proj(out.transpose(1, 2).flatten(2))  # [B, N, dim]


MLP_CHUNK_ELEMENTS = 1 << 22  # hidden activations per piece on CPU outside training: 16 MiB of float32


class MLP(nn.Sequential):
    """Linear(dim, hidden) -> activation -> Linear(hidden, dim); keys `0.*` and `2.*` as released.

    On CPU outside training, inputs whose hidden activations would pass MLP_CHUNK_ELEMENTS go through a piece of
    rows at a time (the same values: the MLP acts on each row alone). Larger blocks exceed glibc's mmap threshold
    (32 MiB at most), so every call would map them afresh and fault in every page: the guided call's 2B rows at
    the small config, 22,700 page faults and +30 ms a step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, MLP_CHUNK_ELEMENTS // self[0].out_features)
        if self.training or x.device.type != "cpu" or x.shape[:-1].numel() <= rows:
            return super().forward(x)
        pieces = x.reshape(-1, x.shape[-1]).split(rows)
        return torch.cat([super(MLP, self).forward(piece) for piece in pieces]).view(*x.shape[:-1], -1)


def mlp(dim: int, ratio: float = 4.0, activation: Activation | str = Activation.GELU) -> MLP:
    """Linear(dim, ratio*dim) -> activation -> Linear(ratio*dim, dim)."""
    hidden = int(ratio * dim)
    act = nn.GELU() if Activation(activation) is Activation.GELU else QuickGELU()
    return MLP(nn.Linear(dim, hidden), act, nn.Linear(hidden, dim))


def drop_text(text: torch.Tensor, text_mask: torch.Tensor | None, null_text: torch.Tensor, drop_prob: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classifier-free training: each caption [L, D] of text [B, L, D] becomes `null_text` [L, D] with probability
    `drop_prob`, and its mask row all True (every position of the learned null embedding is attended)."""
    drop = torch.rand(text.shape[0], generator=generator, device=text.device) < drop_prob  # [B]
    text = torch.where(drop[:, None, None], null_text.to(text.dtype), text)
    if text_mask is not None:
        text_mask = text_mask | drop[:, None]
    return text, text_mask
