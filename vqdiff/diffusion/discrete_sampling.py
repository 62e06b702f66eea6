"""Samplers of `MaskAndReplaceDiffusion`: ancestral (every step or exact skip steps), purity, classifier-free
guidance, truncation and inpainting.

A step needs little of p(x0 | x_t): at tokens not masked in x_t its value p(x0 = x_t), which sets their
posterior weights, and whole rows only at the tokens then drawn from the network (a few per step, every
token at the last). `X0Distribution` (x0_distribution.py) gives both without building the guided, tempered, truncated
[B, K, N] distribution; tokens are drawn by inverse CDF. Work and memory stay O(B K N), no per-token loops.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import SamplingStrategy
from .guidance import guided_call
from .losses import shifted_exp
from .x0_distribution import X0Distribution


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample VQ-Diffusion: the VQ-Diffusion keys of the config's `sample:` section, checked on creation.

    steps: network calls (None: every step), evenly strided, each an exact skip step q(x_s | x_t, x0).
    truncation_rate: keep the smallest set of classes holding that much of p(x0 | x_t) per token.
    temperature: divides the logits. guidance_scale != 1: classifier-free guidance (needs null_cond).
    strategy: ancestral, or purity (reveal the purest masked tokens first, Tang et al. 2022)."""
    steps: int | None = None
    truncation_rate: float = 1.0
    temperature: float = 1.0
    guidance_scale: float = 1.0
    strategy: SamplingStrategy = SamplingStrategy.ANCESTRAL

    def __post_init__(self):
        object.__setattr__(self, "strategy", SamplingStrategy(self.strategy))
        if not 0.0 < self.truncation_rate <= 1.0:
            raise ValueError(f"truncation_rate must lie in (0, 1], got {self.truncation_rate}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def sampling_timesteps(num_timesteps: int, steps: int | None = None) -> list[int]:
    """The times T-1 = t_0 > ... > t_{S-1} >= 0 of S network calls, evenly strided (S = T: every step)."""
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return [i * num_timesteps // steps - 1 for i in range(steps, 0, -1)]


def ancestral_step(diffusion, x0_dist: X0Distribution, xt: torch.Tensor, t: int, s: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for every token, -1 <= s < t (s = -1: x_0)."""
    K = diffusion.num_classes
    content = (xt != K).flatten().nonzero().squeeze(1)
    p_xt = torch.zeros(xt.numel(), device=xt.device)
    p_xt[content] = x0_dist.prob_at(content, xt.flatten()[content])
    out, from_model = _mixture_draw(diffusion, xt, t, s, p_xt.view(xt.shape), generator)
    drawn = from_model.flatten().nonzero().squeeze(1)
    out.view(-1)[drawn] = x0_dist.draw(drawn, generator)
    return out


def dense_ancestral_step(diffusion, x0_dist: X0Distribution, xt: torch.Tensor, t: int, s: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`ancestral_step` for GPUs, without truncation: p(x0 | x_t) of every token in one pass over
    [B, K, N] and a draw for every token by inverse CDF, used where the mixture picks the model. Nothing
    waits for the GPU, so the CPU queues the step while the network still runs; the sparse step's
    nonzero() calls would wait and then issue ~50 small kernels to an idle GPU."""
    K = diffusion.num_classes
    masked = xt == K
    exps, _ = shifted_exp(x0_dist.scaled(), dim=1)  # [B, K, N], largest class 1
    at_xt = exps.gather(1, xt.masked_fill(masked, 0).unsqueeze(1)).squeeze(1)
    cdf = exps.cumsum_(dim=1)
    total = cdf[:, -1]  # [B, N]
    p_xt = torch.where(masked, 0.0, at_xt / total)
    out, from_model = _mixture_draw(diffusion, xt, t, s, p_xt, generator)
    u = torch.rand(total.shape, generator=generator, device=xt.device, dtype=total.dtype)
    target = torch.minimum(u * total, total * (1 - 2.0 ** -23)).unsqueeze(1)  # strictly below the total
    x0 = (cdf <= target).sum(dim=1).clamp_(max=K - 1)  # searchsorted(cdf, target, right=True)
    return torch.where(from_model, x0, out)


def _mixture_draw(diffusion, xt: torch.Tensor, t: int, s: int, p_xt: torch.Tensor,
                  generator: torch.Generator | None):
    """Draw each token's component of the posterior mixture given p(x0 = x_t) `[B, N]`: returns x_s where the
    component is uniform, [MASK] or keep, and a mask `[B, N]` of the tokens to draw from the model."""
    K = diffusion.num_classes
    t_vec = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
    masked = xt == K
    mix = diffusion.posterior_mixture(xt, t_vec, torch.full_like(t_vec, s), p_xt)
    # Regions of u in order: uniform, [MASK], model, keep. A masked token's model region runs to 1 and a
    # content token's keep region too, so rounding never leaves a [MASK] where it has weight 0.
    u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
    end_uniform = mix.uniform
    end_mask = end_uniform + mix.mask
    end_model = torch.where(masked, 2.0, end_mask + mix.model)
    out = torch.where(u < end_uniform, torch.randint(K, xt.shape, generator=generator, device=xt.device), xt)
    out = out.masked_fill((u >= end_uniform) & (u < end_mask), K)
    return out, (u >= end_mask) & (u < end_model)


def purity_step(x0_dist: X0Distribution, xt: torch.Tensor, mask_id: int, keep_masked: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Reveal masked tokens until `keep_masked` `[B]` remain, those with the largest max_k p(x0 = k | x_t)
    first, each drawn from p(x0 | x_t); revealed tokens stay."""
    masked = xt == mask_id
    rows = masked.flatten().nonzero().squeeze(1)
    purity = torch.full((xt.numel(),), -1.0, device=xt.device)
    purity[rows] = x0_dist.purity(rows)
    order = purity.view(xt.shape).argsort(dim=1, descending=True)
    positions = torch.arange(xt.shape[1], device=xt.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # masked tokens rank before the others
    revealed = (rank < (masked.sum(dim=1) - keep_masked).unsqueeze(1)).flatten().nonzero().squeeze(1)
    out = xt.clone()
    out.view(-1)[revealed] = x0_dist.draw(revealed, generator)
    return out


@torch.no_grad()
def sample_iter(diffusion, model, batch_size: int, num_tokens: int, options: SamplingOptions,
                cond: dict | None = None, null_cond: dict | None = None,
                known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, progress: bool = False, device=None):
    """Yield the token map `[B, N]` after every step; the last one has no [MASK]. See
    `MaskAndReplaceDiffusion.sample` for the arguments. Ancestral sampling starts from the prior
    p(x_{T-1}), purity sampling from all [MASK]."""
    strategy, truncation_rate, guidance_scale = options.strategy, options.truncation_rate, options.guidance_scale
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs null_cond (the unconditional inputs)")
    cond = cond or {}
    device = _sample_device(device, known_tokens, cond, generator)
    known = _check_known(known_tokens, known_mask, batch_size, num_tokens, diffusion.num_classes, device)
    times = sampling_timesteps(diffusion.num_timesteps, options.steps)
    gamma_bar = diffusion.schedule.gamma_bar
    if strategy is SamplingStrategy.PURITY:
        if gamma_bar[times[0]] <= 0:
            raise ValueError("purity sampling starts from all [MASK]; this schedule never masks at t = T-1")
        xt = torch.full((batch_size, num_tokens), diffusion.mask_id, dtype=torch.long, device=device)
    else:
        xt = diffusion.sample_prior(batch_size, num_tokens, generator, device)
    if known is not None:
        xt = torch.where(known[1], known[0], xt)
    initial_masked = (xt == diffusion.mask_id).sum(dim=1)
    for t, s in tqdm(zip(times, times[1:] + [-1]), total=len(times), disable=not progress, desc="sampling"):
        t_vec = torch.full((batch_size,), t, dtype=torch.long, device=device)
        cond_logits, null_logits = guided_call(model, xt, t_vec, cond, null_cond, guidance_scale)
        for logits in (cond_logits, null_logits):
            check_logits(logits, batch_size, diffusion.num_classes, num_tokens)
        x0_dist = X0Distribution(cond_logits, null_logits, guidance_scale, options.temperature, truncation_rate)
        if strategy is SamplingStrategy.PURITY:
            # keep the masked share of the schedule: gamma_bar_s / gamma_bar_{T-1} of those masked at first
            share = float(gamma_bar[s] / gamma_bar[times[0]]) if s >= 0 else 0.0
            xt = purity_step(x0_dist, xt, diffusion.mask_id, torch.round(initial_masked * share).long(),
                             generator)
        else:
            step = dense_ancestral_step if _dense(device, truncation_rate) else ancestral_step
            xt = step(diffusion, x0_dist, xt, t, s, generator)
        if known is not None:
            xt = torch.where(known[1], known[0], xt)
        yield xt


def _dense(device: torch.device, truncation_rate: float) -> bool:
    """Whether ancestral steps read every token's row (`dense_ancestral_step`): on GPUs, without truncation."""
    return device.type != "cpu" and truncation_rate >= 1.0


def check_logits(logits: torch.Tensor | None, batch_size: int, num_classes: int, num_tokens: int) -> None:
    """A network's output must be logits [B, K, N] over the content classes."""
    if logits is not None and tuple(logits.shape) != (batch_size, num_classes, num_tokens):
        raise ValueError(f"the network must return logits [B, K, N] = {[batch_size, num_classes, num_tokens]} "
                         f"(no [MASK] logit), got {list(logits.shape)}")


def _check_known(known_tokens, known_mask, batch_size, num_tokens, num_classes, device):
    """(tokens, mask) on device for inpainting, or None."""
    if known_tokens is None and known_mask is None:
        return None
    if known_tokens is None or known_mask is None:
        raise ValueError("inpainting needs both known_tokens and known_mask")
    shape = (batch_size, num_tokens)
    if tuple(known_tokens.shape) != shape or tuple(known_mask.shape) != shape:
        raise ValueError(f"known_tokens and known_mask must have shape {list(shape)}, got "
                         f"{list(known_tokens.shape)} and {list(known_mask.shape)}")
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor, got {known_mask.dtype}")
    tokens = known_tokens[known_mask]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_classes):
        raise ValueError(f"known tokens must lie in [0, {num_classes - 1}] where known_mask is set")
    return known_tokens.to(device=device, dtype=torch.long), known_mask.to(device)


def _sample_device(device, known_tokens, cond: dict, generator) -> torch.device:
    if device is not None:
        return torch.device(device)
    if known_tokens is not None:
        return known_tokens.device
    tensors = [v for v in cond.values() if isinstance(v, torch.Tensor)]
    if tensors:
        return tensors[0].device
    return generator.device if generator is not None else torch.device("cpu")
