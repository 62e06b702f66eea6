"""Fewer-step sampling on a subset of the timesteps (Nichol & Dhariwal 2021, Sec. 4; Song et al. 2021).

Keeping steps s_0 < s_1 < ... < s_{K-1} of a Gaussian process and alpha_bar unchanged there gives again
a Markov diffusion, with beta_i = 1 - alpha_bar[s_i] / alpha_bar[s_{i-1}]. `GaussianDiffusion.respace`
builds it; the network keeps seeing the original indices s_i.
"""

from collections.abc import Iterable, Sequence

import torch


def space_timesteps(num_timesteps: int, section_counts: "int | str | Sequence[int]") -> list[int]:
    """Sorted timesteps to keep out of `num_timesteps`, as improved-diffusion's `space_timesteps`.

    `section_counts` is
    - an int or "50": that many steps spread evenly over [0, T-1] (both ends kept);
    - "10,15,20" (or a list of ints): the schedule cut into equal sections, each with its own count;
    - "ddim50": every k-th step 0, k, 2k, ... with the integer stride k that gives exactly 50 steps.
    """
    if num_timesteps < 1:
        raise ValueError(f"space_timesteps: num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        return _ddim_steps(num_timesteps, _parse_count(section_counts[len("ddim"):], section_counts))
    counts = _parse_sections(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"space_timesteps: cannot take {count} steps from a section of {size} "
                             f"(num_timesteps={num_timesteps}, sections={counts})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return steps


def respace_betas(alphas_cumprod: torch.Tensor, use_timesteps: Iterable[int]) -> torch.Tensor:
    """Betas `[K]` (float64) of the process restricted to `use_timesteps`, same alpha_bar at kept steps."""
    kept = validate_timesteps(use_timesteps, len(alphas_cumprod))
    alpha_bar = alphas_cumprod.to(torch.float64)[kept]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return 1.0 - alpha_bar / previous


def validate_timesteps(use_timesteps: Iterable[int], num_timesteps: int) -> torch.Tensor:
    """Sorted unique kept steps as a long tensor; raises if empty or out of [0, num_timesteps)."""
    kept = sorted({int(s) for s in use_timesteps})
    if not kept:
        raise ValueError("respace: no timesteps to keep")
    if kept[0] < 0 or kept[-1] >= num_timesteps:
        raise ValueError(f"respace: timesteps must lie in [0, {num_timesteps}), got {kept[0]}..{kept[-1]}")
    return torch.tensor(kept, dtype=torch.long)


def _ddim_steps(num_timesteps: int, count: int) -> list[int]:
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"space_timesteps: no integer stride gives exactly {count} steps out of {num_timesteps}")


def _parse_sections(section_counts) -> list[int]:
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        counts = [_parse_count(part, section_counts) for part in section_counts.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"space_timesteps: section counts must be positive integers, got {section_counts!r}")
    return counts


def _parse_count(text: str, whole: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"space_timesteps: cannot read {whole!r}; use an int, '50', '10,10,10' or "
                         "'ddim50'") from None
