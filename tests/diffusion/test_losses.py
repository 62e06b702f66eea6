"""The continuous likelihood terms of losses.py against numerical integration, scipy and mpmath (float64)."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import norm

from vqdiff.diffusion.losses import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl

F64 = torch.float64
BIN_CENTRES = torch.linspace(-1, 1, 256, dtype=F64)  # the 8-bit values of data scaled to [-1, 1]


@pytest.mark.parametrize("mean1, std1, mean2, std2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 1.5),
                                                      (2.0, 0.1, 1.0, 0.05), (-1.0, 3.0, 0.5, 0.7)])
def test_normal_kl_against_numerical_integration(mean1, std1, mean2, std2):
    def integrand(x):
        return norm.pdf(x, mean1, std1) * (norm.logpdf(x, mean1, std1) - norm.logpdf(x, mean2, std2))

    want, _ = integrate.quad(integrand, mean1 - 30 * std1, mean1 + 30 * std1, epsabs=1e-13, limit=200)
    got = normal_kl(torch.tensor(mean1, dtype=F64), torch.tensor(2 * math.log(std1), dtype=F64),
                    torch.tensor(mean2, dtype=F64), torch.tensor(2 * math.log(std2), dtype=F64))
    assert got.item() == pytest.approx(want, rel=1e-8, abs=1e-12)


def test_gaussian_log_likelihood_against_scipy():
    x = torch.linspace(-3, 3, 13, dtype=F64)
    mean, log_scale = torch.tensor(0.4, dtype=F64), torch.tensor(-0.7, dtype=F64)
    want = norm.logpdf(x.numpy(), 0.4, math.exp(-0.7))
    np.testing.assert_allclose(gaussian_log_likelihood(x, mean, log_scale).numpy(), want, rtol=1e-13)


@pytest.mark.parametrize("mean, std", [(0.0, 0.3), (0.9, 0.004), (-1.3, 0.5), (0.2, 1e-4), (0.0, 50.0)])
def test_discretized_bins_form_a_distribution(mean, std):
    log_p = discretized_gaussian_log_likelihood(BIN_CENTRES, torch.tensor(mean, dtype=F64),
                                                torch.tensor(math.log(std), dtype=F64))
    assert (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_discretized_matches_scipy_in_the_bulk():
    g = torch.Generator().manual_seed(0)
    x = BIN_CENTRES[torch.randint(0, 256, (500,), generator=g)]
    x[:2] = torch.tensor([-1.0, 1.0], dtype=F64)
    mean = x + 0.05 * torch.randn(500, generator=g, dtype=F64)
    std = torch.exp(torch.empty(500, dtype=F64).uniform_(-5, -1, generator=g))
    upper = np.where(x.numpy() > 0.999, np.inf, x.numpy() + 1 / 255)
    lower = np.where(x.numpy() < -0.999, -np.inf, x.numpy() - 1 / 255)
    with np.errstate(divide="ignore"):
        want = np.log(norm.cdf(upper, mean.numpy(), std.numpy()) - norm.cdf(lower, mean.numpy(), std.numpy()))
    got = discretized_gaussian_log_likelihood(x, mean, torch.log(std)).numpy()
    finite = want > -12  # scipy's difference of CDFs is only accurate where the mass is not tiny
    assert finite.sum() > 400
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("x, mean, std", [
    (1.0, -1.0, 0.01),           # the top bin, 200 sd away: log mass ~ -2e4 (float64 CDFs give -inf)
    (-1.0, 1.0, 0.02),           # the bottom bin from the other side
    (0.6, -0.5, 0.05),           # an inner bin deep in the right tail (lower > 0: the flipped branch)
    (-0.6, 0.5, 0.05),           # an inner bin deep in the left tail
    (0.0, 0.0, 1e3),             # a very wide Gaussian: the mass is the bin width times the density
    (120 / 127.5 - 1, 0.0, 0.3), # an ordinary bin
])
def test_discretized_in_the_tails_against_mpmath(x, mean, std):
    mpmath.mp.dps = 60
    half = mpmath.mpf(1) / 255
    upper = mpmath.inf if x > 0.999 else (mpmath.mpf(x) + half - mean) / std
    lower = -mpmath.inf if x < -0.999 else (mpmath.mpf(x) - half - mean) / std
    if lower > 0:  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): 60 digits cannot hold 1 - 1e-8700
        lower, upper = -upper, -lower
    want = float(mpmath.log(mpmath.ncdf(upper) - mpmath.ncdf(lower)))
    got = discretized_gaussian_log_likelihood(torch.tensor(x, dtype=F64), torch.tensor(mean, dtype=F64),
                                              torch.tensor(math.log(std), dtype=F64)).item()
    assert got == pytest.approx(want, rel=1e-9)


def test_discretized_gradients_are_finite_and_correct():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=F64), BIN_CENTRES[torch.randint(0, 256, (60,),
                                                                                           generator=g)]])
    mean = (x + 0.5 * torch.randn(64, generator=g, dtype=F64)).requires_grad_()
    log_scale = torch.empty(64, dtype=F64).uniform_(-9, 4, generator=g).requires_grad_()
    log_p = discretized_gaussian_log_likelihood(x, mean, log_scale)
    grads = torch.autograd.grad(log_p.sum(), (mean, log_scale))
    assert all(torch.isfinite(grad).all() for grad in grads)
    moderate = (slice(None, 8),)  # gradcheck on inputs where finite differences are well conditioned
    inputs = (mean.detach()[moderate].clone().clamp(-1.2, 1.2).requires_grad_(),
              torch.full((8,), -2.0, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda m, s: discretized_gaussian_log_likelihood(x[moderate], m, s), inputs)


@pytest.mark.parametrize("log_scale", [-8.0, -5.0, -3.0, 0.0, 2.0])
def test_discretized_float32_agrees_with_float64(log_scale):
    # decoder scales from 3e-4 to 7 (a decoder at t = 0 has sd ~1e-2); the float32 error grows with the
    # scale as the bin's mass is then a small difference of CDFs near 1/2 (3e-4 nats at sd 7, 2e-3 at 55)
    g = torch.Generator().manual_seed(2)
    x = BIN_CENTRES.float()
    mean = x + torch.exp(torch.tensor(log_scale)) * torch.randn(256, generator=g)
    log_scale = torch.full_like(mean, log_scale).requires_grad_()
    want = discretized_gaussian_log_likelihood(x.double(), mean.double(), log_scale.double())
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(torch.autograd.grad(got.sum(), log_scale)[0]).all()


def test_log_1_min_a_has_finite_gradients_near_zero():
    from vqdiff.diffusion.losses import log_1_min_a
    a = torch.tensor([-1e-12, -1e-8, -0.5, -1.0, -30.0], requires_grad=True)
    log_1_min_a(a).sum().backward()
    assert torch.isfinite(a.grad).all()
    expected = -torch.exp(a.detach().double()) / -torch.expm1(a.detach().double())  # d/da log(1 - e^a)
    torch.testing.assert_close(a.grad.double(), expected, rtol=1e-3, atol=0)
