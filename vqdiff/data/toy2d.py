"""2-D toy distributions (S-curve, Swiss roll, two moons) and a sliced Wasserstein distance to score samples.

Each set is a curve traced by a uniform parameter u in [0, 1) (the noise-free forms of scikit-learn's
`make_s_curve` (x, z), `make_swiss_roll` (x, z) and `make_moons`), then normalised by fixed constants:
the noise-free distribution is shifted to mean 0 and scaled by one factor (keeping its aspect ratio) so
that E|x|^2 = 2, i.e. unit root-mean-square per coordinate. Gaussian noise of std `noise` is added after
normalisation, so `noise` means the same for every set.
"""

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

TOY2D_NAMES = ("scurve", "swissroll", "moons")


def _curve(name: str, u: np.ndarray) -> np.ndarray:
    """Map u in [0, 1) [n] to unnormalised points on the named curve [n, 2]."""
    if name == "scurve":
        t = 3 * np.pi * (u - 0.5)
        return np.stack([np.sin(t), np.sign(t) * (np.cos(t) - 1)], axis=1)
    if name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * u)
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    if name == "moons":
        upper = u < 0.5
        theta = np.pi * np.where(upper, 2 * u, 2 * u - 1)
        x = np.where(upper, np.cos(theta), 1 - np.cos(theta))
        y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
        return np.stack([x, y], axis=1)
    raise ValueError(f"unknown toy data set {name!r}; choose one of {TOY2D_NAMES}")


@functools.lru_cache(maxsize=None)
def _normalisation(name: str) -> tuple[np.ndarray, float]:
    """Mean and RMS scale of the noise-free curve, by the midpoint rule on a dense grid of u."""
    grid = (np.arange(200_000) + 0.5) / 200_000
    points = _curve(name, grid)
    center = points.mean(axis=0)
    scale = float(np.sqrt(((points - center) ** 2).sum(axis=1).mean() / 2))
    return center, scale


def sample_toy2d(name: str, n: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Draw `n` normalised points [n, 2] float32 from the named set with a numpy generator seeded by `seed`."""
    if name not in TOY2D_NAMES:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {TOY2D_NAMES}")
    if n < 0 or noise < 0:
        raise ValueError(f"n and noise must be non-negative, got n={n}, noise={noise}")
    rng = np.random.default_rng(seed)
    center, scale = _normalisation(name)
    points = (_curve(name, rng.random(n)) - center) / scale
    return (points + noise * rng.standard_normal((n, 2))).astype(np.float32)


class Toy2D(Dataset):
    """A fixed sample of a toy set as a torch Dataset; items are {"x": FloatTensor [2]}."""

    def __init__(self, name: str = "scurve", num_samples: int = 10_000, seed: int = 0, noise: float = 0.05):
        self.name = name
        self.points = torch.from_numpy(sample_toy2d(name, num_samples, seed, noise))  # [N, 2]

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"x": self.points[index]}


def sliced_wasserstein(a, b, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds [n, d] and [m, d] (numpy or torch).

    SW_2(a, b)^2 = E_theta W_2^2(<theta, a>, <theta, b>) over uniform unit directions theta (Rabin et al.
    2011), estimated with `num_projections` random directions. Each 1-D W_2^2 is the exact integral over
    q in [0, 1] of the squared difference of the two empirical quantile functions (step functions).
    """
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need non-empty point clouds [n, d] and [m, d], got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((a.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    proj_a, proj_b = np.sort(a @ theta, axis=0), np.sort(b @ theta, axis=0)  # [n, P], [m, P]
    # both quantile functions are constant between consecutive multiples of 1/n and of 1/m
    breaks = np.union1d(np.arange(len(a) + 1) / len(a), np.arange(len(b) + 1) / len(b))
    mids, widths = (breaks[1:] + breaks[:-1]) / 2, np.diff(breaks)
    diff = proj_a[(mids * len(a)).astype(int)] - proj_b[(mids * len(b)).astype(int)]  # [segments, P]
    return float(np.sqrt((widths[:, None] * diff ** 2).sum(axis=0).mean()))
