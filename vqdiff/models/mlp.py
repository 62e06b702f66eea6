"""A small residual MLP denoiser for low-dimensional (2-D toy) data: `model(x [B, D], t [B]) -> [B, out_dim]`."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import timestep_embedding


class MLPBlock(nn.Module):
    """LayerNorm-SiLU-Linear, add the time embedding, SiLU-Linear, residual; the last Linear starts at zero."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb_proj(F.silu(emb))  # [B, hidden]
        return h + self.fc2(F.silu(z))


class MLPDenoiser(nn.Module):
    """Residual MLP with sinusoidal time conditioning.

    t may be integer steps (0..T-1) or floats on the same scale; the sinusoidal embedding resolves
    differences of about one step, so continuous times in [0, 1] should be scaled up (e.g. by 1000) first.
    `out_dim` defaults to `data_dim`; use 2 * data_dim for a learned variance (epsilon and v).
    """

    def __init__(self, data_dim: int = 2, hidden: int = 128, num_layers: int = 3, time_embed_dim: int = 128,
                 out_dim: int | None = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.data_dim = data_dim
        self.time_embed_dim = time_embed_dim
        self.out_dim = out_dim if out_dim is not None else data_dim
        self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.fc_in = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, self.out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must be [B, {self.data_dim}], got {list(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got {list(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed_dim))  # [B, hidden]
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(F.silu(self.norm_out(h)))  # [B, out_dim]
