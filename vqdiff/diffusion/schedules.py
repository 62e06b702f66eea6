"""Noise schedules, all computed in float64.

Gaussian: beta_t for t = 0..T-1 (Ho et al. 2020; cosine from Nichol & Dhariwal 2021 eq. 17).
Discrete: the mask-and-replace tables of VQ-Diffusion (Gu et al. 2022, eq. 4-5).
"""

import math
from dataclasses import dataclass

import torch

from ..options import BetaSchedule


def beta_schedule(name: "BetaSchedule | str", num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> torch.Tensor:
    """Betas `[T]` in float64. beta_start/beta_end are the T=1000 values; linear scales them by 1000/T."""
    name = BetaSchedule(name)
    T = num_timesteps
    if name is BetaSchedule.LINEAR:
        scale = 1000.0 / T
        if scale * beta_end >= 1:
            raise ValueError(f"linear beta schedule with T={T}: beta_end scaled by 1000/T is {scale * beta_end:g} "
                             ">= 1; use more timesteps or the cosine schedule")
        return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
    if name is BetaSchedule.QUADRATIC:
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if name is BetaSchedule.SIGMOID:
        x = torch.linspace(-6.0, 6.0, T, dtype=torch.float64)
        return torch.sigmoid(x) * (beta_end - beta_start) + beta_start
    # cosine: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)


@dataclass(frozen=True)
class MaskAndReplaceSchedule:
    """Per-step and cumulative transition weights of the mask-and-replace process, float64, length T.

    One step: a content token stays with alpha + beta, becomes each of the K classes with beta
    (including itself), and becomes [MASK] with gamma; [MASK] stays [MASK]. Cumulative tables
    (alpha_bar, beta_bar, gamma_bar) describe q(x_t | x_0) in the same form. alpha + K*beta + gamma = 1.
    """
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    alpha_bar: torch.Tensor
    beta_bar: torch.Tensor
    gamma_bar: torch.Tensor
    num_classes: int

    @property
    def num_timesteps(self) -> int:
        return self.alpha.shape[0]


# Named presets: (att_1, att_T, ctt_1, ctt_T) = alpha_bar and gamma_bar at the first and last step.
MASK_AND_REPLACE_PRESETS = {
    # The released VQ-Diffusion schedule: beta is ~1e-6/K, so almost pure masking.
    "released": (0.99999, 0.000009, 0.000009, 0.99999),
    # The paper's setting: gamma_bar rises to 0.9 and K*beta_bar to ~0.1 (real uniform replacement).
    "paper": (0.99999, 0.000009, 0.000009, 0.9),
    # Pure absorbing diffusion: no replacement at all (alpha_bar = 1 - gamma_bar).
    "absorbing": (1.0 - 0.000009, 1.0 - 0.99999, 0.000009, 0.99999),
}


def mask_and_replace_schedule(num_timesteps: int, num_classes: int, att_1: float = 0.99999,
                              att_T: float = 0.000009, ctt_1: float = 0.000009,
                              ctt_T: float = 0.99999) -> MaskAndReplaceSchedule:
    """alpha_bar and gamma_bar linear in t from (att_1, ctt_1) to (att_T, ctt_T), as the released code.

    beta_bar = (1 - alpha_bar - gamma_bar) / K; a total replace weight K * beta_bar below 1e-12 is float
    rounding of alpha_bar + gamma_bar = 1 and is set to exactly 0, so an absorbing schedule stays absorbing.
    The per-step tables compose back into the cumulative ones (Gu et al. 2022, eq. 5).
    """
    T, K = num_timesteps, num_classes
    if T < 1 or K < 2:
        raise ValueError(f"mask_and_replace_schedule: need num_timesteps >= 1 and num_classes >= 2, got {T}, {K}")
    if not all(0.0 <= v <= 1.0 for v in (att_1, att_T, ctt_1, ctt_T)):
        raise ValueError("mask_and_replace_schedule: att_1, att_T, ctt_1, ctt_T must lie in [0, 1], got "
                         f"{att_1}, {att_T}, {ctt_1}, {ctt_T}")
    ramp = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
    alpha_bar = att_1 + ramp * (att_T - att_1)
    gamma_bar = ctt_1 + ramp * (ctt_T - ctt_1)
    beta_bar = (1 - alpha_bar - gamma_bar) / K
    if (beta_bar < -1e-12).any():
        raise ValueError("mask_and_replace_schedule: alpha_bar + gamma_bar exceeds 1; the replace weight "
                         f"would be negative (att_1={att_1}, att_T={att_T}, ctt_1={ctt_1}, ctt_T={ctt_T})")
    beta_bar = torch.where(K * beta_bar < 1e-12, 0.0, beta_bar)
    prev_alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    prev_beta_bar = torch.cat([torch.zeros(1, dtype=torch.float64), beta_bar[:-1]])
    prev_gamma_bar = torch.cat([torch.zeros(1, dtype=torch.float64), gamma_bar[:-1]])
    alpha = alpha_bar / prev_alpha_bar
    gamma = (gamma_bar - prev_gamma_bar) / (1 - prev_gamma_bar)  # (1 - gamma_bar) is a product of (1 - gamma)
    # beta_bar_t = alpha_t beta_bar_{t-1} + beta_t (alpha_bar_{t-1} + K beta_bar_{t-1}): one step after t-1
    beta = (beta_bar - alpha * prev_beta_bar) / (prev_alpha_bar + K * prev_beta_bar)
    if (beta < -1e-12).any():
        raise ValueError("mask_and_replace_schedule: beta_bar falls faster than alpha_bar; a per-step replace "
                         f"weight would be negative (att_1={att_1}, att_T={att_T}, ctt_1={ctt_1}, ctt_T={ctt_T})")
    return MaskAndReplaceSchedule(alpha=alpha, beta=beta.clamp_min(0), gamma=gamma, alpha_bar=alpha_bar,
                                  beta_bar=beta_bar, gamma_bar=gamma_bar, num_classes=K)


def mask_and_replace_preset(name: str, num_timesteps: int, num_classes: int) -> MaskAndReplaceSchedule:
    if name not in MASK_AND_REPLACE_PRESETS:
        raise ValueError(f"unknown mask-and-replace preset {name!r}; choose from "
                         f"{sorted(MASK_AND_REPLACE_PRESETS)}")
    return mask_and_replace_schedule(num_timesteps, num_classes, *MASK_AND_REPLACE_PRESETS[name])
