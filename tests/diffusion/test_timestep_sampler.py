"""Time samplers: the importance distribution p(t) ∝ sqrt(E[L_t^2]) with its uniform floor, unbiased
weights, and the state that goes into checkpoints.

Synthetic losses L_t = scale_t * u with u ~ Uniform(0, sqrt(3)) have E[L_t^2] = scale_t^2 exactly.
"""

import math

import pytest
import torch

from vqdiff.diffusion.timestep_sampler import ImportanceSampler, UniformSampler

SCALES = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
MEAN_U = math.sqrt(3) / 2  # E[u] for u ~ Uniform(0, sqrt(3)); E[u^2] = 1


def synthetic_losses(t, generator):
    return SCALES[t] * torch.rand(len(t), generator=generator, dtype=torch.float64) * math.sqrt(3)


def train_like(sampler, steps, generator, batch_size=64):
    """The trainer's loop: draw t, observe the per-sample losses, update."""
    for _ in range(steps):
        t, _ = sampler.sample(batch_size, generator=generator)
        sampler.update(t, synthetic_losses(t, generator))


def target(uniform_prob):
    return (1 - uniform_prob) * SCALES / SCALES.sum() + uniform_prob / len(SCALES)


@pytest.mark.parametrize("mode", [{"history": 200}, {"history": 10, "ema_decay": 0.99}])
def test_importance_distribution_converges_to_sqrt_second_moment(mode):
    g = torch.Generator().manual_seed(0)
    sampler = ImportanceSampler(len(SCALES), uniform_prob=0.05, **mode)
    torch.testing.assert_close(sampler.probabilities(), torch.full((8,), 1 / 8, dtype=torch.float64))
    train_like(sampler, 300, g)
    assert sampler.warmed_up()
    # sd of the estimate of sqrt(E[L^2]): 0.5 sqrt(Var(u^2) / n_eff) = 3.2% for n_eff = 200 (the history,
    # or (1 + d) / (1 - d) = 199 for the EMA); 15% is ~4.5 sd
    relative_error = sampler.probabilities() / target(0.05) - 1
    assert relative_error.abs().max() < 0.15, relative_error


def test_sampling_frequencies_follow_the_probabilities():
    g = torch.Generator().manual_seed(1)
    sampler = ImportanceSampler(len(SCALES), history=50, uniform_prob=0.05)
    train_like(sampler, 100, g)
    p = sampler.probabilities()
    t, weights = sampler.sample(100_000, generator=g)
    frequency = torch.bincount(t, minlength=8).double() / 100_000
    assert ((frequency - p).abs() < 5 * (p * (1 - p) / 100_000).sqrt()).all()
    torch.testing.assert_close(weights.double(), 1 / (8 * p[t]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("make", [lambda: UniformSampler(8), lambda: ImportanceSampler(8, history=50)])
def test_weighted_loss_is_unbiased_for_the_uniform_mean(make):
    g = torch.Generator().manual_seed(2)
    sampler = make()
    train_like(sampler, 100, g)
    n = 200_000
    t, weights = sampler.sample(n, generator=g)
    estimates = weights.double() * SCALES[t] * MEAN_U  # w_t E[L_t]: E_p[w_t L_t] = mean_t E[L_t]
    truth = SCALES.mean().item() * MEAN_U
    assert abs(estimates.mean().item() - truth) < 5 * estimates.std().item() / math.sqrt(n)
    if isinstance(sampler, ImportanceSampler):  # importance sampling must also lower the variance here
        uniform = SCALES[torch.randint(0, 8, (n,), generator=g)] * MEAN_U
        assert estimates.var() < 0.5 * uniform.var()


def test_uniform_floor_bounds_the_weights():
    g = torch.Generator().manual_seed(3)
    sampler = ImportanceSampler(4, history=5, uniform_prob=0.01)
    for _ in range(5):
        sampler.update(torch.arange(4), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    p = sampler.probabilities()
    torch.testing.assert_close(p, torch.tensor([0.0025, 0.0025, 0.0025, 0.9925], dtype=torch.float64))
    _, weights = sampler.sample(1000, generator=g)
    assert weights.max() <= 1 / (4 * 0.0025) + 1e-3


def test_all_zero_losses_fall_back_to_uniform():
    sampler = ImportanceSampler(3, history=2)
    for _ in range(2):
        sampler.update(torch.arange(3), torch.zeros(3))
    assert sampler.warmed_up()
    torch.testing.assert_close(sampler.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_history_keeps_the_last_values_and_ema_decays():
    history = ImportanceSampler(1, history=3)
    ema = ImportanceSampler(1, history=3, ema_decay=0.9)
    for loss in (1.0, 2.0, 3.0, 4.0):
        for sampler in (history, ema):
            sampler.update(torch.tensor([0]), torch.tensor([loss]))
    assert sorted(history.loss_history[0].tolist()) == [2.0, 3.0, 4.0]
    torch.testing.assert_close(history.second_moment(), torch.tensor([29 / 3], dtype=torch.float64))
    moment = 1.0
    for loss in (2.0, 3.0, 4.0):
        moment = 0.9 * moment + 0.1 * loss ** 2
    torch.testing.assert_close(ema.second_moment(), torch.tensor([moment], dtype=torch.float64))


@pytest.mark.parametrize("mode", [{"history": 20}, {"history": 20, "ema_decay": 0.9}])
def test_state_dict_round_trip(mode):
    g = torch.Generator().manual_seed(4)
    sampler = ImportanceSampler(8, **mode)
    train_like(sampler, 20, g)
    restored = ImportanceSampler(8, **mode)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities(), rtol=0, atol=0)
    draws = [s.sample(16, generator=torch.Generator().manual_seed(5)) for s in (sampler, restored)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    for s in (sampler, restored):  # and they keep evolving identically
        train_like(s, 5, torch.Generator().manual_seed(6))
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities(), rtol=0, atol=0)
    state = sampler.state_dict()
    state["count"][0] = -1  # the state is a copy: loading it later must not see later updates
    assert sampler.count[0] >= 0


def test_load_state_dict_rejects_a_mismatch():
    state = ImportanceSampler(8, history=10).state_dict()
    with pytest.raises(ValueError, match="num_timesteps or history"):
        ImportanceSampler(9, history=10).load_state_dict(state)
    del state["count"]
    with pytest.raises(KeyError, match="count"):
        ImportanceSampler(8, history=10).load_state_dict(state)
