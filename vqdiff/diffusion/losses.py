"""Likelihood terms shared by both processes: Gaussian KL / discretized decoder and log-space helpers.

Continuous terms follow Ho et al. 2020 (Sec. 3.3) and Nichol & Dhariwal 2021; discrete ones work on
log-probabilities `[B, C, N]` with the class dimension at dim 1.
"""

import math

import torch
import torch.nn.functional as F

LOG_EPS = -70.0  # log of "zero" probability: exp(-70) ~ 4e-31 stays finite in float32 arithmetic


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales, num_bins: int = 256):
    """log p(x) of data in [-1, 1] quantised to `num_bins` levels under N(means, exp(log_scales)^2).

    Ho et al. 2020 eq. (13): the edge bins extend to -inf / +inf. Uses exact log-CDFs (log_ndtr), so
    it is accurate in the tails where differences of CDFs underflow.
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half_bin)
    lower = inv_std * (x - means - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    log_mid = _log_normal_mass(lower, upper)
    edge = 1.0 - half_bin
    return torch.where(x < -edge, log_cdf_upper,
                       torch.where(x > edge, log_one_minus_cdf_lower, log_mid))


def _log_normal_mass(lower, upper):
    """log(Phi(upper) - Phi(lower)) for lower < upper, computed on the side of 0 where it does not cancel."""
    flip = lower > 0  # both in the right tail: use Phi(-lower) - Phi(-upper)
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + log_1_min_a(torch.clamp(torch.special.log_ndtr(lo) - log_hi, max=-1e-12))


def gaussian_log_likelihood(x, mean, log_scale):
    """Continuous log N(x; mean, exp(log_scale)^2), elementwise (for data that are not pixels)."""
    return -0.5 * (math.log(2 * math.pi) + 2 * log_scale + (x - mean) ** 2 * torch.exp(-2 * log_scale))


# ---- log-space helpers for categorical distributions -------------------------------------------

def log_1_min_a(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stable at both ends (Maechler 2012)."""
    # each branch sees only inputs in its own range, so the unused one cannot put NaN into the gradient
    near_zero = a > -math.log(2.0)
    return torch.where(near_zero, torch.log(-torch.expm1(a.clamp(min=-math.log(2.0)))),
                       torch.log1p(-torch.exp(a.clamp(max=-math.log(2.0)))))


def index_to_log_onehot(x: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Token ids `[B, N]` -> log one-hot `[B, num_classes, N]` with LOG_EPS for the zeros."""
    out = torch.full((x.shape[0], num_classes, x.shape[1]), LOG_EPS, device=x.device, dtype=dtype)
    return out.scatter_(1, x.unsqueeze(1), 0.0)


def shifted_exp(logits: torch.Tensor, dim: int = 1, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(logits - max), max) along dim, without autograd; the max keeps its dim. inplace reuses logits.

    exp is floored at the smallest normal float: exp that underflows to subnormals runs 20-40x slower on
    CPUs, and peaked or guided logits do that for most classes. A probability moves by ~1e-38 at most.
    """
    floor = math.log(torch.finfo(logits.dtype).tiny) + 1.0
    top = logits.amax(dim=dim, keepdim=True)
    shifted = logits.sub_(top) if inplace else logits - top
    return shifted.clamp_min_(floor).exp_(), top


def stable_softmax(logits: torch.Tensor, dim: int = 1, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, log-normaliser) of logits along dim via `shifted_exp`, without autograd."""
    probs, top = shifted_exp(logits, dim, inplace)
    total = probs.sum(dim=dim, keepdim=True)
    return probs.div_(total), (top + total.log()).squeeze(dim)


def log_softmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=dim)
