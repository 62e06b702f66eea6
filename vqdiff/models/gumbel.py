"""The Gumbel-softmax quantizer of the VQ-VAE tokenizer (taming's GumbelQuantize) and its temperature schedule."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..options import TemperatureDecay


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) draws, -log(E) with E ~ Exp(1), shaped like `like`."""
    exponential = torch.empty_like(like).exponential_(generator=generator)
    return -exponential.clamp_min(torch.finfo(like.dtype).tiny).log()


def gumbel_softmax(logits: torch.Tensor, temperature: float, hard: bool, dim: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau) with g ~ Gumbel(0, 1) (Jang et al. 2017); `hard` gives the one-hot of its argmax
    with the soft sample's gradient (straight-through)."""
    soft = ((logits + gumbel_noise(logits, generator)) / temperature).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


class GumbelQuantizer(nn.Module):
    """Code logits from a 1x1 conv, a Gumbel-softmax sample over the codebook, and its embedding (taming's
    GumbelQuantize). `kl` is KL(softmax(logits) || uniform) per position, averaged; `kl_loss` = kl_weight * kl.

    Every method takes an optional `code_map` [K'] of kept full codes: logits and codebook are then restricted to
    those codes and the ids they return or take are positions in `code_map`."""

    def __init__(self, num_hiddens: int, embedding_dim: int, num_embeddings: int, straight_through: bool = True,
                 kl_weight: float = 5e-4, temperature: float = 1.0):
        super().__init__()
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be at least 2, got {num_embeddings}")
        self.num_embeddings = num_embeddings
        self.straight_through = straight_through
        self.kl_weight = kl_weight
        self.temperature = temperature
        self.proj = nn.Conv2d(num_hiddens, num_embeddings, 1)
        self.embed = nn.Embedding(num_embeddings, embedding_dim)

    def logits(self, z: torch.Tensor, code_map: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.proj(z)  # [B, K, h, w]
        return logits if code_map is None else logits.index_select(1, code_map)

    def codebook(self, code_map: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed.weight if code_map is None else self.embed.weight.index_select(0, code_map)  # [K', D]

    def forward(self, z: torch.Tensor, temperature: float | None = None, code_map: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training: a Gumbel-softmax sample (hard with straight_through). Eval: the one-hot argmax, no noise."""
        logits = self.logits(z, code_map)
        if self.training:
            tau = self.temperature if temperature is None else temperature
            one_hot = gumbel_softmax(logits, tau, hard=self.straight_through, generator=generator)
        else:
            one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook(code_map))
        log_q = logits.float().log_softmax(1)
        # KL(q || U(K')) = sum_k q_k (log q_k + log K'), the Gumbel VQ prior term
        kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1).mean()
        return dict(z_q=z_q, logits=logits, kl=kl, kl_loss=self.kl_weight * kl, tokens=one_hot.argmax(1))

    def sample_ids(self, z: torch.Tensor, sample: bool = False, code_map: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """The argmax code per position, or with `sample` a draw from softmax(logits) (the released VQ-Diffusion
        encoder, which applies Gumbel noise even at inference)."""
        logits = self.logits(z, code_map).float()
        if sample:
            logits = logits + gumbel_noise(logits, generator)  # Gumbel-max: argmax ~ Categorical(softmax(logits))
        return logits.argmax(1)  # [B, h, w]

    def embed_ids(self, ids: torch.Tensor, code_map: torch.Tensor | None = None) -> torch.Tensor:
        codes = ids if code_map is None else code_map[ids]
        return self.embed(codes).permute(0, 3, 1, 2)  # [B, D, h, w]


class FactoredGumbelQuantizer(GumbelQuantizer):
    """A product codebook: code (i, j), id i * factors[1] + j, of factors[0] x factors[1] codes, embeds as the
    concatenation of row i of one table and row j of another; its logit is a_i + b_j, so softmax over all codes is
    the product of two categoricals and a Gumbel-softmax sample over the ids draws both at once. Every code pairs
    parts that are each trained with many partners, so a pair never seen in training still has a code; the
    intent is one factor for the outline and one for the colour of a patch (docs/shapes_experiments.md)."""

    def __init__(self, num_hiddens: int, embedding_dim: int, factors: tuple[int, int], straight_through: bool = True,
                 kl_weight: float = 5e-4, temperature: float = 1.0):
        first, second = factors
        if first < 2 or second < 2:
            raise ValueError(f"both factors must be at least 2, got {list(factors)}")
        if embedding_dim < 2:
            raise ValueError(f"embedding_dim must be at least 2 to split between the factors, got {embedding_dim}")
        super().__init__(num_hiddens, embedding_dim, first * second, straight_through, kl_weight, temperature)
        self.factors = (first, second)
        self.proj = nn.Conv2d(num_hiddens, first + second, 1)
        half = embedding_dim // 2
        del self.embed
        self.embed_first = nn.Embedding(first, half)
        self.embed_second = nn.Embedding(second, embedding_dim - half)

    def factor_logits(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.proj(z)  # [B, F + S, h, w]
        return parts[:, :self.factors[0]], parts[:, self.factors[0]:]

    def logits(self, z: torch.Tensor, code_map: torch.Tensor | None = None) -> torch.Tensor:
        first, second = self.factor_logits(z)
        logits = (first[:, :, None] + second[:, None]).flatten(1, 2)  # [B, F * S, h, w]
        return logits if code_map is None else logits.index_select(1, code_map)

    def codebook(self, code_map: torch.Tensor | None = None) -> torch.Tensor:
        first, second = self.factors
        rows = torch.cat([self.embed_first.weight[:, None].expand(-1, second, -1),
                          self.embed_second.weight[None].expand(first, -1, -1)], -1).flatten(0, 1)  # [F * S, D]
        return rows if code_map is None else rows.index_select(0, code_map)

    def embed_ids(self, ids: torch.Tensor, code_map: torch.Tensor | None = None) -> torch.Tensor:
        return F.embedding(ids, self.codebook(code_map)).permute(0, 3, 1, 2)  # [B, D, h, w]


class SplitGumbelQuantizer(FactoredGumbelQuantizer):
    """A product codebook whose factors share nothing: the first factor's logits read the first `hidden_split`
    feature channels and its embedding fills the first `embed_split` latent channels, the second factor the rest
    (the layered tokenizer's outline and colour, models/layered_codec.py)."""

    def __init__(self, num_hiddens: int, embedding_dim: int, factors: tuple[int, int], hidden_split: int,
                 embed_split: int, straight_through: bool = True, kl_weight: float = 5e-4, temperature: float = 1.0):
        super().__init__(num_hiddens, embedding_dim, factors, straight_through, kl_weight, temperature)
        first, second = self.factors
        self.hidden_split = hidden_split
        self.proj = nn.Conv2d(hidden_split, first, 1)
        self.proj_second = nn.Conv2d(num_hiddens - hidden_split, second, 1)
        self.embed_first = nn.Embedding(first, embed_split)
        self.embed_second = nn.Embedding(second, embedding_dim - embed_split)

        # per code of both factors: picks and summed reconstruction error since the last restart (restart_unused)
        self.register_buffer("usage", torch.zeros(first + second, dtype=torch.float64))
        self.register_buffer("error", torch.zeros(first + second, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    restart_every = 100  # training calls between restarts

    def factor_logits(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(z[:, :self.hidden_split]), self.proj_second(z[:, self.hidden_split:])

    @torch.no_grad()
    def observe(self, ids: torch.Tensor, error: torch.Tensor) -> None:
        """Count the picked codes of both factors (ids [B, h, w], full codes) and add up each one's
        reconstruction error (error [B, h, w], the squared error of its patch)."""
        first, second = self.factors
        parts = (ids // second, ids % second + first)
        for part in parts:
            flat = part.flatten()
            self.usage += torch.bincount(flat, minlength=first + second).double()
            self.error += torch.bincount(flat, weights=error.flatten().double(), minlength=first + second)

    @torch.no_grad()
    def restart_unused(self) -> None:
        """Every `restart_every` training calls, in each factor: a code picked less than once per 100 * (its
        factor's size) picks becomes a copy of the code with the largest summed error (its embedding with a little
        noise, the same logit weights), so the two split that code's patches and learn apart. A straight-through
        Gumbel row learns only when picked: without this, two colours ended on one code while eight rows never
        trained (docs/shapes_experiments.md). Deterministic, and the same on every process."""
        self.calls += 1
        if int(self.calls) % self.restart_every:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.usage)
            torch.distributed.all_reduce(self.error)
        generator = torch.Generator().manual_seed(int(self.calls))
        first, second = self.factors
        parts = ((0, first, self.proj, self.embed_first), (first, first + second, self.proj_second, self.embed_second))
        for low, high, proj, embed in parts:
            usage, error = self.usage[low:high], self.error[low:high]
            if usage.sum() == 0:
                continue
            dead = torch.nonzero(usage < usage.sum() / (100 * (high - low))).flatten()
            if len(dead) == 0:
                continue
            target, donor = int(dead[0]), int(error.argmax())
            noise = torch.randn(embed.weight.shape[1], generator=generator) * 0.01 * float(embed.weight.std())
            embed.weight[target] = embed.weight[donor] + noise.to(embed.weight)
            proj.weight[target] = proj.weight[donor]
            proj.bias[target] = proj.bias[donor]
        self.usage.zero_()
        self.error.zero_()


@dataclass
class TemperatureSchedule:
    """Gumbel temperature from `start` at step 0 to `end` at `steps`, then constant. The exponential schedule is
    DALL-E's (1 -> 1/16); cosine is taming's LambdaWarmUpCosineScheduler without warm-up."""

    start: float = 1.0
    end: float = 1.0 / 16
    steps: int = 100_000
    decay: TemperatureDecay = TemperatureDecay.EXPONENTIAL

    def __post_init__(self):
        self.decay = TemperatureDecay(self.decay)
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"temperatures must be positive, got start={self.start}, end={self.end}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def temperature_at(step: int, schedule: TemperatureSchedule) -> float:
    """The Gumbel-softmax temperature at a training step."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    progress = min(step / schedule.steps, 1.0)
    start, end = schedule.start, schedule.end
    if schedule.decay is TemperatureDecay.CONSTANT:
        return start
    if schedule.decay is TemperatureDecay.LINEAR:
        return start + (end - start) * progress
    if schedule.decay is TemperatureDecay.EXPONENTIAL:
        return start * (end / start) ** progress
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
