"""GaussianDiffusion: equations against Bayes' rule in float64, the variational bound of an oracle against
closed forms and the true likelihood, the losses' structure, and samplers against exact Gaussian answers.

Gaussian data x_0 ~ N(mu, Sigma) make every quantity closed form: with Sigma = V diag(lam) V^T,
E[x_0 | x_t] = mu + V diag(sqrt(a) lam / (a lam + 1 - a)) V^T (x_t - sqrt(a) mu), a = alpha_bar_t.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from vqdiff.diffusion.gaussian import GaussianDiffusion, LossType, MeanType, VarType
from vqdiff.diffusion.schedules import beta_schedule

F64 = torch.float64
LOG2 = math.log(2.0)


def alpha_bar_of(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), dim=0)


def bayes_posterior(betas, t: int, x0, xt):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0) as a product of Gaussians in x_{t-1}."""
    beta = betas[t].item()
    abar_prev = alpha_bar_of(betas)[t - 1].item()
    # q(x_t | x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta): precision (1-beta)/beta, centre x_t / sqrt(1-beta)
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = (math.sqrt(1 - beta) / beta * xt + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / precision
    return mean, 1 / precision, math.sqrt(abar_prev) / (1 - abar_prev) / precision  # mean, var, x0 coef


class GaussianOracle:
    """The exact denoiser of data N(mu, V diag(lam) V^T), in any parameterisation of a diffusion.

    With `kept` (the steps a sampler visits, original indices) it also knows the exact reverse variance
    Var[x_{s} | x_t] = beta_tilde + c1^2 Var[x_0 | x_t] per dimension (diagonal data only), which makes
    the learned-variance reverse process equal the true one.
    """

    def __init__(self, alpha_bar, mu, lam, mean_type, V=None, kept=None, learned=False):
        self.a, self.mu, self.lam = alpha_bar, mu, lam
        self.V = torch.eye(len(mu), dtype=F64) if V is None else V
        self.mean_type, self.learned = MeanType(mean_type), learned
        kept = range(len(alpha_bar)) if kept is None else kept
        self.prev = torch.full_like(alpha_bar, float("nan"))  # alpha_bar of the previous visited step
        for i, step in enumerate(kept):
            self.prev[step] = alpha_bar[kept[i - 1]] if i else 1.0

    def xstart(self, x, t):
        a = self.a[t][:, None]  # [B, 1]
        gain = a.sqrt() * self.lam / (a * self.lam + 1 - a)  # [B, D]
        centred = (x - a.sqrt() * self.mu) @ self.V
        return self.mu + (gain * centred) @ self.V.T

    def reverse_log_variance(self, x, t):
        a, a_prev = self.a[t][:, None], self.prev[t][:, None]
        beta = 1 - a / a_prev
        c1 = beta * a_prev.sqrt() / (1 - a)
        x0_var = self.lam * (1 - a) / (a * self.lam + 1 - a)
        return torch.log(beta * (1 - a_prev) / (1 - a) + c1 ** 2 * x0_var).expand_as(x)

    def __call__(self, x, t):
        a = self.a[t][:, None]
        x0 = self.xstart(x, t)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = {MeanType.START_X: x0, MeanType.EPSILON: eps,
               MeanType.VELOCITY: a.sqrt() * eps - (1 - a).sqrt() * x0}[self.mean_type]
        return torch.cat([out, self.reverse_log_variance(x, t)], dim=1) if self.learned else out


def diag_data(num, dim, generator):
    mu = torch.linspace(-0.4, 0.4, dim, dtype=F64)
    lam = torch.linspace(0.04, 0.5, dim, dtype=F64)
    return mu, lam, mu + lam.sqrt() * torch.randn(num, dim, generator=generator, dtype=F64)


# ---- the forward process and the posterior -----------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    betas = beta_schedule(schedule, 50)
    diffusion = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(2, 5, 3, generator=g, dtype=F64)
    for step in (1, 2, 17, 49):
        t = torch.full((5,), step)
        mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
        want_mean, want_var, _ = bayes_posterior(betas, step, x0, xt)
        torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, torch.full_like(var, want_var), rtol=1e-12, atol=0)
        torch.testing.assert_close(log_var, torch.log(var), rtol=1e-12, atol=0)
    first = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(first[0], x0, rtol=0, atol=1e-12)  # x_{-1} is x_0 itself
    assert (first[1] == 0).all() and torch.isfinite(first[2]).all()


def test_posterior_against_numerical_integration():
    betas = beta_schedule("linear", 100)
    step, x0, xt = 30, 0.4, -0.7
    abar = alpha_bar_of(betas)
    beta, abar_prev = betas[step].item(), abar[step - 1].item()
    grid = np.linspace(-3, 3, 200001)
    log_density = (-(xt - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
                   - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    want_mean = (weights * grid).sum()
    want_var = (weights * (grid - want_mean) ** 2).sum()
    mean, var, _ = GaussianDiffusion(betas).q_posterior_mean_variance(
        torch.tensor([[x0]], dtype=F64), torch.tensor([[xt]], dtype=F64), torch.tensor([step]))
    assert mean.item() == pytest.approx(want_mean, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(want_var, rel=1e-5)


def test_q_sample_statistics():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.8, dtype=F64)
    for step in (0, 40, 99):
        a = alpha_bar_of(diffusion.betas)[step].item()
        xt = diffusion.q_sample(x0, torch.full((n,), step), generator=g)
        std = math.sqrt(1 - a)
        # standard errors of the mean and variance of n normals: std/sqrt(n), var*sqrt(2/n)
        assert abs(xt.mean().item() - math.sqrt(a) * 0.8) < 5 * std / math.sqrt(n)
        assert abs(xt.var().item() - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / n)
        mean, var, log_var = diffusion.q_mean_variance(x0[:2], torch.full((2,), step))
        torch.testing.assert_close(mean, torch.full_like(mean, math.sqrt(a) * 0.8))
        torch.testing.assert_close(var, torch.full_like(var, 1 - a))
        torch.testing.assert_close(log_var, torch.full_like(var, math.log(1 - a)))


def test_parameterisations_round_trip():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 200))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 8, 3, 4, 4, generator=g, dtype=F64)
    t = torch.randint(0, 200, (8,), generator=g)
    xt = diffusion.q_sample(x0, t, noise)
    a = alpha_bar_of(diffusion.betas)[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022
    torch.testing.assert_close(diffusion.velocity(x0, noise, t), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(xt, t, noise), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(xt, t, x0), noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(xt, t, v), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.predict_v_from_xstart(xt, t, x0), v, rtol=1e-9, atol=1e-9)
    xprev = diffusion.q_posterior_mean_variance(x0, xt, t)[0]
    torch.testing.assert_close(diffusion.predict_xstart_from_xprev(xt, t, xprev), x0, rtol=1e-7, atol=1e-7)


def test_tables_are_float64_and_gathers_follow_the_input_dtype():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 10))
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2"):
        table = getattr(diffusion, name)
        assert table.dtype == F64 and table.shape == (10,), name
    x = torch.ones(3, 2)
    assert diffusion.q_sample(x, torch.tensor([0, 4, 9])).dtype == torch.float32
    torch.testing.assert_close(diffusion.posterior_log_variance_clipped[0], diffusion.posterior_log_variance_clipped[1])


@pytest.mark.parametrize("betas", [[], [0.1, 1.0], [0.0, 0.1], [[0.1]]])
def test_bad_betas_raise(betas):
    with pytest.raises(ValueError, match="betas|beta"):
        GaussianDiffusion(betas)


# ---- training losses ---------------------------------------------------------------------------

def linear_model(channels_in, channels_out, generator):
    weight = (0.3 * torch.randn(channels_out, channels_in, generator=generator)).requires_grad_()

    def model(x, t):  # a 1x1 convolution / linear map plus a t-dependent shift
        shift = (t.float() / 100.0).view(-1, *([1] * (x.ndim - 1)))
        return torch.einsum("oc,bc...->bo...", weight, x) + shift

    return model, weight


@pytest.mark.parametrize("loss_type", list(LossType))
@pytest.mark.parametrize("var_type", list(VarType))
@pytest.mark.parametrize("mean_type", list(MeanType))
def test_training_losses_every_combination(mean_type, var_type, loss_type):
    g = torch.Generator().manual_seed(3)
    diffusion = GaussianDiffusion(beta_schedule("linear", 100), mean_type, var_type, loss_type)
    learned = var_type in (VarType.LEARNED, VarType.LEARNED_RANGE)
    for shape in ((4, 3, 5, 5), (6, 2)):
        model, weight = linear_model(shape[1], shape[1] * (2 if learned else 1), g)
        x0 = torch.rand(shape, generator=g) * 2 - 1
        t = torch.tensor([0, 1, 50, 99] + [7] * (shape[0] - 4))
        terms = diffusion.training_losses(model, x0, t, generator=g)
        assert all(v.shape == (shape[0],) and torch.isfinite(v).all() for v in terms.values())
        is_kl = loss_type in (LossType.KL, LossType.RESCALED_KL)
        assert ("mse" in terms) == (not is_kl)
        assert ("vb" in terms) == (is_kl or learned or loss_type is LossType.HYBRID)
        terms["loss"].sum().backward()
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_loss_weights_and_hybrid():
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 400, (8,), generator=g)
    model, _ = linear_model(3, 6, g)
    betas = beta_schedule("cosine", 400)

    def losses(loss_type, **kwargs):
        diffusion = GaussianDiffusion(betas, "epsilon", "learned_range", loss_type, **kwargs)
        return diffusion.training_losses(model, x0, t, noise=noise)

    mse, rescaled, hybrid = losses("mse"), losses("rescaled_mse"), losses("hybrid", lambda_vlb=0.01)
    torch.testing.assert_close(mse["loss"], mse["mse"] + mse["vb"])
    torch.testing.assert_close(rescaled["loss"], mse["mse"] + 0.4 * mse["vb"])  # T / 1000
    torch.testing.assert_close(hybrid["loss"], mse["mse"] + 0.01 * 400 * mse["vb"])  # lambda * T
    torch.testing.assert_close(losses("hybrid")["loss"], rescaled["loss"])  # lambda = 0.001 is N&D's choice
    torch.testing.assert_close(losses("rescaled_kl")["loss"], 0.4 * losses("kl")["vb"])


def test_vb_term_trains_only_the_variance_next_to_mse():
    diffusion = GaussianDiffusion(beta_schedule("linear", 100), "epsilon", "learned_range", "hybrid")
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    out = torch.randn(4, 4, 3, 3, generator=g).clamp(-1, 1).requires_grad_()
    terms = diffusion.training_losses(lambda x, t: out, x0, torch.tensor([0, 3, 50, 99]), generator=g)
    mean_grad, var_grad = torch.autograd.grad(terms["vb"].sum(), out)[0].split(2, dim=1)
    assert (mean_grad == 0).all() and var_grad.abs().sum() > 0
    kl = GaussianDiffusion(beta_schedule("linear", 100), "epsilon", "learned_range", "kl")
    terms = kl.training_losses(lambda x, t: out, x0, torch.tensor([0, 3, 50, 99]), generator=g)
    assert torch.autograd.grad(terms["loss"].sum(), out)[0][:, :2].abs().sum() > 0  # KL alone trains the mean


def test_kl_term_equals_direct_computation():
    betas = beta_schedule("cosine", 100)
    diffusion = GaussianDiffusion(betas, "epsilon", "learned_range", "kl", discrete_data=True)
    g = torch.Generator().manual_seed(6)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4), generator=g, dtype=F64) / 127.5 - 1)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    out = torch.cat([0.5 * torch.randn(x0.shape, generator=g, dtype=F64),
                     torch.rand(x0.shape, generator=g, dtype=F64) * 2 - 1], dim=1)
    t = torch.tensor([0, 1, 63])
    vb = diffusion.training_losses(lambda x, tt: out, x0, t, noise=noise)["vb"]
    abar = alpha_bar_of(betas)
    for i, step in enumerate(t.tolist()):
        a, beta = abar[step].item(), betas[step].item()
        xt = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        eps, v = out[i, :2], out[i, 2:]
        pred_x0 = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if step == 0:
            # decoder: -log of the probability of x0's bin under N(pred_x0, sigma^2), sigma^2 = exp(log var)
            log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(bayes_posterior(betas, 1, 0, 0)[1])
            scale = torch.exp(0.5 * log_var).numpy()
            upper = np.where(x0[i] > 0.999, np.inf, x0[i] + 1 / 255)
            lower = np.where(x0[i] < -0.999, -np.inf, x0[i] - 1 / 255)
            prob = norm.cdf(upper, pred_x0.numpy(), scale) - norm.cdf(lower, pred_x0.numpy(), scale)
            want = -np.log(prob).mean() / LOG2
        else:
            q_mean, q_var, coef_x0 = bayes_posterior(betas, step, x0[i], xt)
            p_mean = bayes_posterior(betas, step, pred_x0, xt)[0]
            log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(q_var)  # N&D eq. 15
            p_var = torch.exp(log_var)
            kl = 0.5 * (torch.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1)
            want = kl.mean().item() / LOG2
        assert vb[i].item() == pytest.approx(float(want), rel=1e-9)


def test_mse_targets_per_mean_type():
    betas = beta_schedule("linear", 50)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 4, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 5, 20, 49])
    abar = alpha_bar_of(betas)[t][:, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    posterior_mean = torch.stack([x0[0]] + [bayes_posterior(betas, s, x0[i], xt[i])[0]
                                            for i, s in enumerate(t.tolist()) if s > 0])
    targets = {"epsilon": noise, "start_x": x0, "velocity": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
               "previous_x": posterior_mean}
    for mean_type, target in targets.items():
        diffusion = GaussianDiffusion(betas, mean_type, "fixed_small", "mse")
        mse = diffusion.training_losses(lambda x, tt: target, x0, t, noise=noise)["mse"]
        assert mse.abs().max() < 1e-20, mean_type  # the exact target gives zero loss


def test_wrong_model_output_shape_raises():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 10), var_type="learned")
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="2x the channels"):
        diffusion.training_losses(lambda x, t: x, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        diffusion.q_sample(x0, torch.tensor([1]))


# ---- the variational bound of an oracle ----------------------------------------------------------

def expected_bound_bits(betas, lam, centred_sq, sq, var_type):
    """E_{x_{1:T} ~ q}[-ELBO(x_0)] per sample in bits/dim for the fixed-variance oracle, in closed form.

    Takes (x_0 - mu)^2 and x_0^2 `[B, D]` (or their data expectations). The oracle's mean differs from
    the true posterior mean by c1 (x_0 - E[x_0|x_t]), whose second moment given x_0 is
    (1 - k sqrt(a))^2 (x_0 - mu)^2 + k^2 (1 - a) with k = sqrt(a) lam / (a lam + 1 - a).
    """
    abar = alpha_bar_of(betas)
    total = torch.zeros_like(centred_sq)
    for step in range(len(betas)):
        a = abar[step].item()
        k = math.sqrt(a) * lam / (a * lam + 1 - a)
        err = (1 - k * math.sqrt(a)) ** 2 * centred_sq + k ** 2 * (1 - a)
        if step == 0:
            var = bayes_posterior(betas, 1, 0, 0)[1]  # both fixed types use beta_tilde_1 here
            total += 0.5 * math.log(2 * math.pi * var) + err / (2 * var)
            continue
        _, q_var, c1 = bayes_posterior(betas, step, 0, 0)
        p_var = betas[step].item() if var_type == "fixed_large" else q_var
        total += 0.5 * (math.log(p_var / q_var) + q_var / p_var - 1 + c1 ** 2 * err / p_var)
    a_last = abar[-1].item()
    total += 0.5 * (-1 - math.log(1 - a_last) + (1 - a_last) + a_last * sq)  # KL to N(0, I)
    return total.mean(dim=1) / LOG2


def true_nll_bits(mu, lam, x0):
    return (0.5 * torch.log(2 * math.pi * lam) + (x0 - mu) ** 2 / (2 * lam)).mean(dim=1) / LOG2


def test_oracle_bound_matches_closed_form_and_exceeds_true_nll():
    betas = beta_schedule("linear", 50)
    g = torch.Generator().manual_seed(8)
    mu, lam, x0 = diag_data(512, 32, g)
    diffusion = GaussianDiffusion(betas, "epsilon", "fixed_large", discrete_data=False)
    oracle = GaussianOracle(alpha_bar_of(betas), mu, lam, "epsilon")
    result = diffusion.calc_bpd_loop(oracle, x0, clip_denoised=False, generator=g)
    assert result["vb"].shape == (512, 50) and result["total_bpd"].shape == (512,)
    torch.testing.assert_close(result["total_bpd"], result["vb"].sum(1) + result["prior_bpd"])
    expected = expected_bound_bits(betas, lam, (x0 - mu) ** 2, x0 ** 2, "fixed_large")
    # one draw of x_t per step: per-dimension sd ~1.5 bits, so the mean over 512 x 32 dims has sd ~0.013
    difference = result["total_bpd"] - expected
    standard_error = difference.std() / math.sqrt(len(difference))
    assert standard_error < 0.02 and difference.mean().abs() < 4 * standard_error
    prior = 0.5 * (-1 - math.log(1 - alpha_bar_of(betas)[-1]) + 1 - alpha_bar_of(betas)[-1]
                   + alpha_bar_of(betas)[-1] * x0 ** 2).mean(1) / LOG2
    torch.testing.assert_close(result["prior_bpd"], prior, rtol=1e-9, atol=1e-12)

    # With data expectations in closed form too (E[(x_0 - mu)^2] = lam): the bound exceeds the entropy
    # of the data (cross-entropy >= entropy), here by 0.17-0.19 bits/dim with beta_t as the variance and
    # 0.76-0.82 with beta_tilde_t (T = 1000; the reverse variance is exact only for unit-variance data).
    for schedule, var_type, gap in (("linear", "fixed_large", 0.25), ("cosine", "fixed_large", 0.25),
                                    ("linear", "fixed_small", 1.0)):
        betas = beta_schedule(schedule, 1000)
        expected = expected_bound_bits(betas, lam, lam[None], (mu ** 2 + lam)[None], var_type).item()
        entropy = (0.5 * torch.log(2 * math.pi * math.e * lam)).mean().item() / LOG2
        assert entropy < expected < entropy + gap, (schedule, var_type, expected - entropy)


@pytest.mark.parametrize("mean_type", ["velocity", "start_x"])
def test_oracle_with_exact_reverse_variance_gives_the_true_likelihood(mean_type):
    # With p(x_{t-1}|x_t) equal to the true reverse q(x_{t-1}|x_t) the joint equals q(x_{0:T}) (up to
    # the prior, KL ~ abar_T ~ 1e-5), so the bound is the exact NLL for every x_0, on average over x_t,
    # whatever the number of steps.
    betas = beta_schedule("linear", 50)
    g = torch.Generator().manual_seed(9)
    mu, lam, x0 = diag_data(512, 32, g)
    diffusion = GaussianDiffusion(betas, mean_type, "learned", discrete_data=False)
    oracle = GaussianOracle(alpha_bar_of(betas), mu, lam, mean_type, learned=True)
    result = diffusion.calc_bpd_loop(oracle, x0, clip_denoised=False, generator=g)
    difference = result["total_bpd"] - true_nll_bits(mu, lam, x0)
    standard_error = difference.std() / math.sqrt(len(difference))
    assert standard_error < 0.015
    assert difference.mean().abs() < 4 * standard_error + 1e-4  # 4 standard errors
    assert result["xstart_mse"].shape == result["mse"].shape == (512, 50)


def test_discrete_decoder_of_a_sharp_model():
    # Decoder mean on the pixel value with sd 5e-5 << half a bin (1/255): all mass in the right bin.
    diffusion = GaussianDiffusion(beta_schedule("cosine", 10), "start_x", "learned")
    x0 = torch.cat([torch.tensor([-1.0, 1.0]), torch.randint(0, 256, (30,)) / 127.5 - 1]).double().view(2, 16)

    def sharp(offset):
        return lambda x, t: torch.cat([x0 + offset, torch.full_like(x0, -20.0)], dim=1)

    assert diffusion.calc_bpd_loop(sharp(0.0), x0)["vb"][:, 0].abs().max() < 1e-9  # log2(1) = 0
    # a mean on the bin's edge halves the mass: 1 bit, except at 1.0 where clipping puts it back
    on_edge = diffusion.calc_bpd_loop(sharp(0.5 / 127.5), x0)["vb"][:, 0]
    torch.testing.assert_close(on_edge, (x0 < 1).double().mean(1), rtol=0, atol=1e-9)
    continuous = GaussianDiffusion(beta_schedule("cosine", 10), "start_x", "learned", discrete_data=False)
    density = continuous.calc_bpd_loop(sharp(0.0), x0, clip_denoised=False)["vb"][:, 0]
    torch.testing.assert_close(density, torch.full_like(density, 0.5 * math.log(2 * math.pi * math.exp(-20)) / LOG2))


# ---- sampling -----------------------------------------------------------------------------------

def conditional_model(x, t, label):
    return 0.1 * x + label.view(-1, *([1] * (x.ndim - 1))) * (1 + t.float().view(-1, *([1] * (x.ndim - 1))) / 50)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (5, 2)])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_shapes_determinism_and_guidance_scale_one(shape, sampler):
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    cond = {"label": torch.linspace(-0.5, 0.5, shape[0])}
    null = {"label": torch.zeros(shape[0])}
    eta = 0.5 if sampler == "ddim" else 0.0
    runs = [diffusion.sample(conditional_model, shape, cond, steps=10, sampler=sampler, eta=eta,
                             generator=torch.Generator().manual_seed(11), progress=False, **extra)
            for extra in ({}, {}, {"guidance_scale": 1.0, "null_cond": null})]
    assert runs[0].shape == shape
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = diffusion.sample(conditional_model, shape, cond, steps=10, sampler=sampler, eta=eta,
                             generator=torch.Generator().manual_seed(12), progress=False)
    assert not torch.equal(runs[0], other)


def test_guidance_combines_the_mean_output_and_keeps_the_conditional_variance():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 20), "epsilon", "learned_range")
    calls = []

    def model(x, t, label):
        calls.append(x.shape[0])
        scale = label.view(-1, 1)
        return torch.cat([scale * x, scale.expand_as(x) * 0.5], dim=1)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(13))
    t = torch.full((4,), 7)
    cond, null = {"label": torch.full((4,), 0.8)}, {"label": torch.full((4,), 0.2)}
    guided = diffusion._guided_model(model, null, 3.0)
    out = diffusion.p_mean_variance(guided, x, t, clip_denoised=False, cond=cond)
    assert calls == [8]  # one call on the 2B batch
    eps = 0.2 * x + 3.0 * (0.8 * x - 0.2 * x)
    want = diffusion.p_mean_variance(lambda *_: torch.cat([eps, torch.full_like(x, 0.4)], 1), x, t,
                                     clip_denoised=False)
    torch.testing.assert_close(out["mean"], want["mean"])
    torch.testing.assert_close(out["log_variance"], want["log_variance"])
    with pytest.raises(ValueError, match="null_cond"):
        diffusion.sample(model, (4, 3), cond, guidance_scale=2.0, progress=False)


def test_sample_iter_yields_one_state_per_respaced_step():
    diffusion = GaussianDiffusion(beta_schedule("linear", 100))
    states = list(diffusion.sample_iter(lambda x, t: 0.1 * x, (2, 3), steps="ddim25", progress=False,
                                        generator=torch.Generator().manual_seed(14)))
    assert [s["t"] for s in states] == list(range(96, -1, -4))
    assert all(s["sample"].shape == s["pred_xstart"].shape == (2, 3) for s in states)
    final = diffusion.sample(lambda x, t: 0.1 * x, (2, 3), steps="ddim25",
                             generator=torch.Generator().manual_seed(14), progress=False)
    assert torch.equal(final, states[-1]["sample"])
    with pytest.raises(ValueError, match="DDIM"):
        diffusion.sample(lambda x, t: x, (2, 3), eta=1.0, progress=False)


def test_ddim_with_eta_one_is_the_ddpm_posterior():
    betas = beta_schedule("cosine", 100)
    ddpm = GaussianDiffusion(betas, "epsilon", "fixed_small")
    model = GaussianOracle(alpha_bar_of(betas), torch.zeros(3, dtype=F64), torch.full((3,), 0.3, dtype=F64),
                           "epsilon")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(15), dtype=F64)
    for step in (1, 30, 99):
        t = torch.full((4,), step)
        ddim_step = ddpm.ddim_sample(model, x, t, clip_denoised=False, eta=1.0,
                                     generator=torch.Generator().manual_seed(step))
        ddpm_step = ddpm.p_sample(model, x, t, clip_denoised=False, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(ddim_step["sample"], ddpm_step["sample"], rtol=1e-10, atol=1e-12)
        # and empirically, for one x_t: the spread of x_{t-1} is the Bayes posterior variance
        many = x[:1].expand(100_000, 3)
        draws = ddpm.ddim_sample(model, many, torch.full((100_000,), step), clip_denoised=False, eta=1.0,
                                 generator=torch.Generator().manual_seed(99))["sample"]
        mean, var, _ = bayes_posterior(betas, step, ddim_step["pred_xstart"][0], x[0])
        assert (draws.var(0) / var - 1).abs().max() < 5 * math.sqrt(2 / 100_000)
        assert ((draws.mean(0) - mean).abs() < 5 * math.sqrt(var / 100_000)).all()


def test_ddpm_with_exact_reverse_variance_samples_the_data_distribution():
    # Diagonal data and the exact reverse variance: ancestral sampling on any step subset is exact,
    # so only Monte Carlo error remains (1e4 samples: sd of a mean <= 0.005, of a variance 1.4%).
    betas = beta_schedule("linear", 1000)
    diffusion = GaussianDiffusion(betas, "epsilon", "learned", discrete_data=False)
    kept = diffusion.respace(50).timestep_map.tolist()
    mu, lam = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.25, 0.04], dtype=F64)
    oracle = GaussianOracle(alpha_bar_of(betas), mu, lam, "epsilon", kept=kept, learned=True)
    g = torch.Generator().manual_seed(16)
    n = 10_000
    samples = diffusion.sample(oracle, (n, 2), steps=50, clip_denoised=False, generator=g, progress=False,
                               noise=torch.randn(n, 2, generator=g, dtype=F64))
    assert ((samples.mean(0) - mu).abs() < 4 * (lam / n).sqrt()).all()
    cov = torch.cov(samples.T)
    assert ((cov.diagonal() / lam - 1).abs() < 4 * math.sqrt(2 / n)).all()
    assert cov[0, 1].abs() < 4 * (lam.prod() / n).sqrt()


def ddim_gain(alpha_bar, kept, lam):
    """Deterministic DDIM's exact end-to-end gain per eigen-direction of data N(mu, V diag(lam) V^T).

    With the oracle's x_0 = mu + k (x_t - sqrt(a_t) mu), Song et al. eq. 12 maps x_t - sqrt(a_t) mu to
    x_s - sqrt(a_s) mu times sqrt(a_s) k + sqrt(1 - a_s) (1 - sqrt(a_t) k) / sqrt(1 - a_t).
    """
    gain = torch.ones_like(lam)
    for i in reversed(range(len(kept))):
        a = alpha_bar[kept[i]]
        a_prev = alpha_bar[kept[i - 1]] if i else torch.tensor(1.0, dtype=F64)
        k = a.sqrt() * lam / (a * lam + 1 - a)
        gain = gain * (a_prev.sqrt() * k + (1 - a_prev).sqrt() * (1 - a.sqrt() * k) / (1 - a).sqrt())
    return gain


def test_ddim_is_the_exact_deterministic_map_and_samples_correlated_data():
    betas = beta_schedule("cosine", 1000)
    abar = alpha_bar_of(betas)
    diffusion = GaussianDiffusion(betas, "velocity", discrete_data=False)
    angle = torch.tensor(0.5, dtype=F64)
    V = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    mu, lam = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([0.3, 0.05], dtype=F64)
    data_cov = V @ torch.diag(lam) @ V.T
    n = 10_000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(17), dtype=F64)
    samples = diffusion.sample(GaussianOracle(abar, mu, lam, "velocity", V=V), (n, 2), steps=100, sampler="ddim",
                               clip_denoised=False, progress=False, noise=noise)
    kept = diffusion.respace(100).timestep_map.tolist()
    gain = ddim_gain(abar, kept, lam)
    exact = mu + (((noise - abar[kept[-1]].sqrt() * mu) @ V) * gain) @ V.T
    torch.testing.assert_close(samples, exact, rtol=1e-9, atol=1e-9)
    # Against the data: DDIM's discretisation shrinks the variance (here by 3% and 6% at 100 steps);
    # the tolerances add 4 Monte Carlo standard errors (sd/sqrt(n) for a mean, var*sqrt(2/n) for a variance).
    shrink = gain ** 2 / lam - 1
    assert ((shrink < 0) & (shrink > -0.07)).all()
    assert ((samples.mean(0) - mu).abs() < 4 * (data_cov.diagonal() / n).sqrt()).all()
    relative_error = ((samples - mu) @ V).var(0) / lam - 1  # along each eigenvector of the data
    assert (relative_error.abs() < 0.07 + 4 * math.sqrt(2 / n)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_network_with_a_cpu_generator_matches_the_cpu_run():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 50), "epsilon", "learned_range")

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 6)

        def forward(self, x, t):
            return torch.tanh(self.linear(x) + t.float()[:, None] / 50)

    network = Network()
    runs = []
    for device in ("cpu", "cuda"):
        network.to(device)
        runs.append(diffusion.sample(network, (4, 3), steps=10, generator=torch.Generator().manual_seed(0),
                                     progress=False).cpu())
        x0 = torch.rand(4, 3, device=device)
        losses = diffusion.training_losses(network, x0, torch.tensor([0, 1, 20, 49], device=device))
        assert losses["loss"].device.type == device
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)  # same draws, float32 arithmetic
