"""2-D toy sets against scikit-learn's formulas, their normalisation and noise, and the sliced Wasserstein distance."""

import numpy as np
import pytest
import torch

from vqdiff.data.toy2d import TOY2D_NAMES, Toy2D, sample_toy2d, sliced_wasserstein


def sklearn_reference(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise-free sets written as in scikit-learn's make_s_curve / make_swiss_roll ((x, z) columns) / make_moons."""
    if name == "scurve":
        t = 3 * np.pi * (rng.random(n) - 0.5)
        return np.stack([np.sin(t), np.sign(t) * (np.cos(t) - 1)], axis=1)
    if name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(n))
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    angles = np.linspace(0, np.pi, n // 2)
    outer = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    inner = np.stack([1 - np.cos(angles), 1 - np.sin(angles) - 0.5], axis=1)
    return np.concatenate([outer, inner])


def standardise(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(axis=0)
    return centred / np.sqrt((centred ** 2).sum(axis=1).mean() / 2)


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_matches_sklearn_shapes_after_normalisation(name):
    ours = sample_toy2d(name, 4000, seed=1, noise=0.0)
    reference = standardise(sklearn_reference(name, 4000, np.random.default_rng(2)))
    assert sliced_wasserstein(ours, reference, seed=3) < 0.05
    for other in set(TOY2D_NAMES) - {name}:
        assert sliced_wasserstein(ours, standardise(sklearn_reference(other, 4000, np.random.default_rng(2)))) > 0.2


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_normalised_to_zero_mean_and_unit_rms(name):
    """Fixed constants (not the sample's own statistics) give mean 0, E|x|^2 / 2 = 1 up to sampling error."""
    points = sample_toy2d(name, 20_000, seed=0, noise=0.0).astype(np.float64)
    assert np.abs(points.mean(axis=0)).max() < 0.03
    assert abs(np.sqrt((points ** 2).sum(axis=1).mean() / 2) - 1) < 0.02
    small = sample_toy2d(name, 50, seed=0, noise=0.0)
    np.testing.assert_array_equal(small, points[:50].astype(np.float32))  # same constants at any n


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_noise_is_the_distance_to_the_curve(name):
    """Isotropic noise of std s leaves points at RMS distance ~s (its normal component) from the clean curve."""
    noise = 0.03
    curve = torch.from_numpy(sample_toy2d(name, 20_000, seed=5, noise=0.0)).double()
    noisy = torch.from_numpy(sample_toy2d(name, 1000, seed=6, noise=noise)).double()
    distance = torch.cdist(noisy, curve).amin(dim=1)
    assert abs(distance.square().mean().sqrt().item() / noise - 1) < 0.1


def test_seeds_and_dataset_items():
    np.testing.assert_array_equal(sample_toy2d("moons", 100, seed=4), sample_toy2d("moons", 100, seed=4))
    assert not np.allclose(sample_toy2d("moons", 100, seed=4), sample_toy2d("moons", 100, seed=5))
    points = sample_toy2d("swissroll", 64, seed=7)
    assert points.shape == (64, 2) and points.dtype == np.float32
    dataset = Toy2D("swissroll", num_samples=64, seed=7)
    assert len(dataset) == 64
    item = dataset[3]
    assert item["x"].dtype == torch.float32 and item["x"].shape == (2,)
    np.testing.assert_array_equal(item["x"].numpy(), points[3])
    with pytest.raises(ValueError, match="unknown toy data set"):
        Toy2D("spiral")


def test_sliced_wasserstein_of_a_translation():
    """Shifting a cloud by c moves every projection by <theta, c>: SW_2^2 = E <theta, c>^2 = |c|^2 / 2 in 2-D."""
    a = np.random.default_rng(0).standard_normal((300, 2))
    shift = np.array([0.3, -0.4])
    assert sliced_wasserstein(a, a, seed=1) == 0.0
    distance = sliced_wasserstein(a, a + shift, num_projections=4000, seed=1)
    assert abs(distance - np.linalg.norm(shift) / np.sqrt(2)) < 0.01
    assert sliced_wasserstein(torch.from_numpy(a), a + shift, num_projections=4000, seed=1) == distance
    assert sliced_wasserstein(a + shift, a, num_projections=4000, seed=1) == pytest.approx(distance)


def test_sliced_wasserstein_unequal_sizes_against_brute_force():
    """In 1-D every projection is +-1, so SW_2 = W_2 = (integral of the squared quantile difference)^(1/2)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((7, 1)), rng.standard_normal((4, 1)) + 0.5
    levels = (np.arange(1_000_000) + 0.5) / 1_000_000
    quantile_a = np.sort(a[:, 0])[np.floor(levels * 7).astype(int)]
    quantile_b = np.sort(b[:, 0])[np.floor(levels * 4).astype(int)]
    brute = np.sqrt(((quantile_a - quantile_b) ** 2).mean())
    assert sliced_wasserstein(a, b, num_projections=3) == pytest.approx(brute, rel=1e-5)
    assert sliced_wasserstein(a, np.concatenate([a, a]), num_projections=5) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="point clouds"):
        sliced_wasserstein(a, np.zeros((3, 2)))
