"""MaskAndReplaceDiffusion against brute force: explicit (K+1)x(K+1) transition matrices built here, Bayes'
rule over every (x_0, x_t) pair, exact enumeration of the loss terms, in float64."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.diffusion.losses import LOG_EPS, index_to_log_onehot
from vqdiff.diffusion.schedules import MASK_AND_REPLACE_PRESETS, mask_and_replace_preset
from vqdiff.diffusion.timestep_sampler import ImportanceSampler

PRESETS = sorted(MASK_AND_REPLACE_PRESETS)


def transition(alpha, beta, gamma, K):
    """M[i, j] = q(next = j | prev = i); the last class is [MASK]."""
    M = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    M[:K, :K] = beta + alpha * torch.eye(K, dtype=torch.float64)
    M[:K, K] = gamma
    M[K, K] = 1.0
    return M


class BruteForce:
    """The process as a chain of explicit step matrices."""

    def __init__(self, schedule):
        K, T = schedule.num_classes, schedule.num_timesteps
        self.K, self.T = K, T
        self.steps = [transition(schedule.alpha[t], schedule.beta[t], schedule.gamma[t], K) for t in range(T)]

    def span(self, s, t):
        """q(x_t | x_s) for -1 <= s <= t (s = -1 is x_0)."""
        M = torch.eye(self.K + 1, dtype=torch.float64)
        for r in range(s + 1, t + 1):
            M = M @ self.steps[r]
        return M

    def posterior(self, p0, xt, t, s):
        """sum_x0 q(x_s | x_t, x0) p0(x0), over the x0 that can produce x_t (none other is consistent)."""
        to_s, s_to_t, to_t = self.span(-1, s), self.span(s, t), self.span(-1, t)
        out = torch.zeros(self.K + 1, dtype=torch.float64)
        for x0 in range(self.K):
            if to_t[x0, xt] > 0:
                out += p0[x0] * to_s[x0] * s_to_t[:, xt] / to_t[x0, xt]
        return out / out.sum()


def padded_log(p):
    """log of a distribution over K content classes, as [1, K+1, 1] with [MASK] = LOG_EPS."""
    return torch.log(torch.cat([p, torch.zeros(1, dtype=p.dtype)])).clamp_min(LOG_EPS).view(1, -1, 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_cumulative_tables_are_products_of_step_matrices(preset):
    K, T = 4, 7
    schedule = mask_and_replace_preset(preset, T, K)
    brute, diffusion = BruteForce(schedule), MaskAndReplaceDiffusion(K, T, schedule)
    soft = torch.softmax(torch.randn(3, K + 1, 5, dtype=torch.float64), dim=1)  # some [MASK] mass too
    for t in range(T):
        cumulative = transition(schedule.alpha_bar[t], schedule.beta_bar[t], schedule.gamma_bar[t], K)
        assert torch.allclose(cumulative, brute.span(-1, t), rtol=0, atol=1e-15)
        tt = torch.full((3,), t)
        expected = torch.einsum("bin,ij->bjn", soft, brute.span(-1, t))
        assert torch.allclose(diffusion.q_probs(soft.log(), tt).exp(), expected, rtol=1e-12, atol=1e-15)
        expected = torch.einsum("bin,ij->bjn", soft, brute.steps[t])
        assert torch.allclose(diffusion.q_step_probs(soft.log(), tt).exp(), expected, rtol=1e-12, atol=1e-15)


def test_absorbing_preset_never_replaces():
    schedule = mask_and_replace_preset("absorbing", 50, 16)
    assert (schedule.beta == 0).all() and (schedule.beta_bar == 0).all()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("soft", [False, True])
def test_q_posterior_is_bayes_rule_for_every_pair_and_skip(preset, soft):
    """Every (x_0, x_t) pair, every -1 <= s < t: one step, skip steps and straight to x_0."""
    K, T = 3, 6
    schedule = mask_and_replace_preset(preset, T, K)
    brute, diffusion = BruteForce(schedule), MaskAndReplaceDiffusion(K, T, schedule)
    generator = torch.Generator().manual_seed(1)
    x0_dists = ([torch.softmax(3 * torch.randn(K, generator=generator, dtype=torch.float64), 0) for _ in range(3)]
                if soft else [F.one_hot(torch.tensor(k), K).double() for k in range(K)])
    for t in range(T):
        for s in range(-1, t):
            for p0, xt in itertools.product(x0_dists, range(K + 1)):
                if not any(brute.span(-1, t)[x0, xt] > 0 for x0 in range(K) if p0[x0] > 0):
                    continue  # x_t impossible given this x_0
                log_xt = index_to_log_onehot(torch.tensor([[xt]]), K + 1, dtype=torch.float64)
                got = diffusion.q_posterior(padded_log(p0), log_xt, torch.tensor([t]), s).exp().view(-1)
                expected = brute.posterior(p0, xt, t, s)
                assert torch.allclose(got, expected, rtol=1e-9, atol=1e-14), (t, s, xt, got, expected)


def test_q_posterior_default_is_one_step_and_t0_is_identity():
    K, T = 5, 10
    diffusion = MaskAndReplaceDiffusion(K, T, "paper")
    generator = torch.Generator().manual_seed(2)
    log_x0 = F.pad(torch.randn(4, K, 6, generator=generator, dtype=torch.float64).log_softmax(1), (0, 0, 0, 1),
                   value=LOG_EPS)
    xt = torch.randint(K + 1, (4, 6), generator=generator)
    log_xt = index_to_log_onehot(xt, K + 1, dtype=torch.float64)
    t = torch.tensor([0, 3, 5, 9])
    assert torch.equal(diffusion.q_posterior(log_x0, log_xt, t), diffusion.q_posterior(log_x0, log_xt, t, t - 1))
    at_zero = diffusion.q_posterior(log_x0, log_xt, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(at_zero.exp(), log_x0.exp(), atol=1e-12)


@pytest.mark.parametrize("preset", ["released", "paper"])
def test_q_sample_frequencies_match_q_probs(preset):
    K, T, n = 3, 5, 200_000
    schedule = mask_and_replace_preset(preset, T, K)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule)
    x0 = torch.tensor([[1]]).expand(n, 1)
    for step in (0, 2, 4):
        t = torch.full((n,), step)
        xt = diffusion.q_sample(x0, t, torch.Generator().manual_seed(step))
        freq = torch.bincount(xt.view(-1), minlength=K + 1).double() / n
        expected = BruteForce(schedule).span(-1, step)[1]
        assert (freq - expected).abs().max() < 5 * math.sqrt(0.25 / n), (freq, expected)


class RecordingModel:
    """Fixed logits; remembers the x_t it was called with."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, xt, t):
        self.xt = xt.clone()
        return self.logits


def brute_kl_tokens(brute, logits, x0, xt, t):
    """Per-token KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) [B, N], differentiable in logits."""
    K = brute.K
    p0 = logits.softmax(dim=1)
    out = torch.zeros(x0.shape, dtype=torch.float64)
    for b, n in itertools.product(range(x0.shape[0]), range(x0.shape[1])):
        tb, k = int(t[b]), int(xt[b, n])
        to_s, s_to_t, to_t = brute.span(-1, tb - 1), brute.span(tb - 1, tb), brute.span(-1, tb)
        q = to_s[x0[b, n]] * s_to_t[:, k] / to_t[x0[b, n], k]
        consistent = torch.tensor([float(to_t[j, k] > 0) for j in range(K)], dtype=torch.float64)
        weights = p0[b, :, n] * consistent / (p0[b, :, n] * consistent).sum()
        p = sum(weights[j] * to_s[j] * s_to_t[:, k] / to_t[j, k] for j in range(K) if to_t[j, k] > 0)
        keep = q > 0
        out[b, n] = (q[keep] * (q[keep].log() - p[keep].log())).sum()
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_training_kl_equals_enumeration_and_gradient(preset):
    K, T, B, N = 4, 6, 12, 5
    schedule = mask_and_replace_preset(preset, T, K)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule, aux_weight=0.1, mask_weight=(2.0, 0.5))
    generator = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(B, K, N, generator=generator, dtype=torch.float64)).requires_grad_()
    x0 = torch.randint(K, (B, N), generator=generator)
    t = torch.arange(B) % T  # t = 0 (decoder NLL) included
    model = RecordingModel(logits)
    losses = diffusion.training_losses(model, x0, t, generator=generator)
    expected = brute_kl_tokens(BruteForce(schedule), logits, x0, model.xt, t)
    assert torch.allclose(losses["kl"], expected.mean(1), rtol=1e-9, atol=1e-12)
    # the t = 0 term is the decoder NLL -log p(x0 | x_0-step) wherever x0 can be a cause of x_t
    weight = torch.where(model.xt == K, 2.0, 0.5).double()
    cross_entropy = -logits.log_softmax(1).gather(1, x0.unsqueeze(1)).squeeze(1)
    aux = 0.1 * (2 - t.double() / T) * (weight * cross_entropy).mean(1)
    assert torch.allclose(losses["aux"], aux, rtol=1e-12)
    assert torch.allclose(losses["loss"], (weight * expected).mean(1) + aux, rtol=1e-9, atol=1e-12)
    grad, = torch.autograd.grad(losses["kl"].sum(), logits)
    expected_grad, = torch.autograd.grad(expected.mean(1).sum(), logits)
    assert torch.allclose(grad, expected_grad, rtol=1e-7, atol=1e-10)


def test_t0_kl_is_decoder_nll():
    K, T, B, N = 6, 10, 8, 16
    diffusion = MaskAndReplaceDiffusion(K, T, "paper")
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(B, K, N, generator=generator, dtype=torch.float64)
    x0 = torch.randint(K, (B, N), generator=generator)
    losses = diffusion.training_losses(RecordingModel(logits), x0, torch.zeros(B, dtype=torch.long), generator)
    nll = -logits.log_softmax(1).gather(1, x0.unsqueeze(1)).squeeze(1).mean(1)
    assert torch.allclose(losses["kl"], nll, rtol=1e-9)


class TableModel:
    """A fixed network: pseudo-random logits looked up by (t, the whole x_t)."""

    def __init__(self, K, T, N, seed=0):
        self.K, self.N = K, N
        generator = torch.Generator().manual_seed(seed)
        self.table = 2 * torch.randn(T, (K + 1) ** N, K, N, generator=generator, dtype=torch.float64)

    def code(self, xt):
        return (xt * (self.K + 1) ** torch.arange(self.N)).sum(1)

    def __call__(self, xt, t):
        return self.table[t, self.code(xt)]


def exact_terms(brute, model, x0_row):
    """L_t = E_{x_t ~ q(x_t | x_0)} mean_n KL_t by enumerating every joint x_t, for t = 0..T-1 (nats)."""
    K, T, N = brute.K, brute.T, x0_row.shape[0]
    states = torch.tensor(list(itertools.product(range(K + 1), repeat=N)))  # [S, N]
    terms = []
    for t in range(T):
        q = brute.span(-1, t)[x0_row, states].prod(1)  # [S]
        tt = torch.full((states.shape[0],), t)
        kl = brute_kl_tokens(brute, model(states, tt), x0_row.expand_as(states), states, tt).mean(1)
        terms.append((q * kl).sum())
    return torch.stack(terms)


def test_importance_weighted_loss_and_vlb_are_unbiased():
    """E_t[w_t L_t] = (1/T) sum_t L_t under importance sampling, and E[vlb] = prior + sum_t L_t, each
    within 4 standard errors of the Monte Carlo mean."""
    K, T, N, B = 3, 8, 2, 40_000
    schedule = mask_and_replace_preset("paper", T, K)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule)
    brute, model = BruteForce(schedule), TableModel(K, T, N)
    x0_row = torch.tensor([2, 0])
    terms = exact_terms(brute, model, x0_row)

    sampler = ImportanceSampler(T, history=2, ema_decay=0.9)
    for _ in range(2):
        sampler.update(torch.arange(T), torch.linspace(0.1, 3.0, T))  # far from uniform
    assert sampler.warmed_up()
    generator = torch.Generator().manual_seed(5)
    t, weights = sampler.sample(B, generator=generator)
    losses = diffusion.training_losses(model, x0_row.expand(B, N), t, generator)
    estimate = weights.double() * losses["kl"]
    error = 4 * estimate.std() / math.sqrt(B)
    assert abs(estimate.mean() - terms.mean()) < error, (estimate.mean(), terms.mean(), error)

    bits = diffusion.vlb(model, x0_row.expand(4000, N), generator=generator).double()
    exact = (diffusion.prior_kl(x0_row.view(1, N)).double() + terms.sum()) / math.log(2)
    assert abs(bits.mean() - exact) < 4 * bits.std() / math.sqrt(4000), (bits.mean(), exact)


def test_prior_kl_matches_enumeration():
    K, T = 5, 20
    schedule = mask_and_replace_preset("paper", T, K)
    diffusion = MaskAndReplaceDiffusion(K, T, schedule)
    q = BruteForce(schedule).span(-1, T - 1)[3]
    gamma = schedule.gamma_bar[-1]
    prior = torch.cat([torch.full((K,), (1 - gamma) / K, dtype=torch.float64), gamma.view(1)])
    expected = (q * (q / prior).log()).sum()
    assert torch.allclose(diffusion.prior_kl(torch.zeros(2, 3, dtype=torch.long)).double(),
                          expected.expand(2).double(), rtol=1e-6)


@pytest.mark.parametrize("K", [2, 4097, 16385])
@pytest.mark.parametrize("preset", PRESETS)
def test_no_nan_or_inf_for_any_t_and_codebook_size(K, preset):
    T, N = 100, 3
    diffusion = MaskAndReplaceDiffusion(K, T, preset)
    generator = torch.Generator().manual_seed(6)
    t = torch.arange(T)
    logits = (30 * torch.randn(T, K, N, generator=generator)).requires_grad_()  # very peaked and very flat
    x0 = torch.randint(K, (T, N), generator=generator)
    xt = diffusion.q_sample(x0, t, generator)
    xt[:, 0], xt[:, 1] = K, x0[:, 1]  # a masked and an unmasked token in every row
    model = lambda x, tt: logits  # noqa: E731
    losses = diffusion.training_losses(model, x0, t, generator)
    grad, = torch.autograd.grad(losses["loss"].sum(), logits)
    assert all(torch.isfinite(v).all() for v in losses.values()) and torch.isfinite(grad).all()
    assert (losses["kl"] > -1e-4).all()
    with torch.no_grad():
        for s in (t - 1, (t - 1) // 2, torch.full_like(t, -1)):
            prev = diffusion.p_prev(model, xt, t, s)
            assert torch.isfinite(prev).all() and (prev <= 0).all()
            assert torch.allclose(prev.exp().sum(1), torch.ones(T, N), atol=1e-4)
        log_x0 = index_to_log_onehot(x0, K + 1)
        assert torch.isfinite(diffusion.q_posterior(log_x0, index_to_log_onehot(xt, K + 1), t)).all()
        assert torch.isfinite(diffusion.p_log_x0(model, xt, t)).all()


def test_bad_inputs_raise_clear_errors():
    diffusion = MaskAndReplaceDiffusion(4, 10)
    x0 = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \[B, K, N\]"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, 5, 3), x0, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="timesteps must lie"):
        diffusion.q_sample(x0, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="x0 ids"):
        diffusion.q_sample(x0 + 4, torch.tensor([0, 1]))
    log = index_to_log_onehot(x0, 5)
    with pytest.raises(ValueError, match="-1 <= s < t"):
        diffusion.q_posterior(log, log, torch.tensor([3, 3]), 3)
    with pytest.raises(ValueError, match="schedule is for"):
        MaskAndReplaceDiffusion(4, 10, mask_and_replace_preset("paper", 10, 5))
