"""Samplers of MaskAndReplaceDiffusion with an oracle network on a tiny known data distribution, plus
truncation against the full-sort reference, guidance, inpainting and the no-[MASK]-left guarantee."""

import itertools
import math

import pytest
import torch

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.diffusion.discrete_sampling import SamplingOptions, SamplingStrategy, sampling_timesteps
from vqdiff.diffusion.truncation import sorted_threshold, truncate
from vqdiff.diffusion.x0_distribution import DENSE_SHARE, X0Distribution, sample_rows
from vqdiff.diffusion.guidance import guide_log_probs

SAMPLES = 20_000


class Oracle:
    """The exact per-token marginals of p(x0 | x_t) for data drawn from `probs` over `configs` [C, N]:
    Bayes over the table with the factorised q(x_t | x0), which is what a perfect network outputs."""

    def __init__(self, diffusion, configs, probs):
        self.diffusion, self.configs, self.probs = diffusion, configs, probs

    def __call__(self, xt, t):
        schedule, K = self.diffusion.schedule, self.diffusion.num_classes
        at, bt, gt = (getattr(schedule, n)[t].view(-1, 1, 1) for n in ("alpha_bar", "beta_bar", "gamma_bar"))
        x0, x = self.configs.unsqueeze(0), xt.unsqueeze(1)  # [1, C, N], [B, 1, N]
        likelihood = torch.where(x == K, gt, torch.where(x == x0, at + bt, bt)).prod(dim=2)  # [B, C]
        posterior = self.probs * likelihood
        posterior = posterior / posterior.sum(dim=1, keepdim=True)
        marginals = torch.einsum("bc,cnk->bkn", posterior, torch.nn.functional.one_hot(self.configs, K).double())
        return marginals.log().clamp_min(-300.0)


def joint_table(K, N, seed):
    """A correlated distribution over all K^N sequences, with some impossible ones."""
    generator = torch.Generator().manual_seed(seed)
    configs = torch.tensor(list(itertools.product(range(K), repeat=N)))
    probs = torch.rand(len(configs), generator=generator, dtype=torch.float64) ** 3
    probs[torch.randperm(len(configs), generator=generator)[: len(configs) // 3]] = 0.0
    return configs, probs / probs.sum()


def total_variation(samples, configs, probs):
    matches = (samples.unsqueeze(1) == configs.unsqueeze(0)).all(dim=2)  # [S, C]
    assert matches.any(dim=1).all(), "a sample is not a valid sequence"
    frequencies = matches.double().mean(dim=0)
    return 0.5 * (frequencies - probs).abs().sum().item()


def random_model(K, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)

    def model(xt, t, **cond):
        return scale * torch.randn(xt.shape[0], K, xt.shape[1], generator=generator)

    return model


# MC noise alone gives a total variation of about 0.005-0.01 at 20k samples over these tables; the
# tolerances below leave room for that and, where stated, for the factorised network output.

def test_ancestral_all_steps_recovers_the_data():
    """Two correlated tokens: a per-token network is exact when they are not revealed at the same
    step, which has probability ~1/T; at T = 40 the bias stays well under the tolerance."""
    configs, probs = joint_table(3, 2, seed=0)
    diffusion = MaskAndReplaceDiffusion(3, 40, "released")
    samples = diffusion.sample(Oracle(diffusion, configs, probs), SAMPLES, 2,
                               generator=torch.Generator().manual_seed(0), progress=False)
    assert total_variation(samples, configs, probs) < 0.025


@pytest.mark.parametrize("steps", [1, 3, 7, 40])
def test_skip_steps_are_exact_for_one_token_with_real_replacement(steps):
    """With one token the oracle is the true posterior, so any exact reverse kernel gives the data;
    the paper schedule's uniform replacement makes revealed tokens matter in every skip posterior."""
    configs, probs = joint_table(4, 1, seed=1)
    diffusion = MaskAndReplaceDiffusion(4, 40, "paper")
    samples = diffusion.sample(Oracle(diffusion, configs, probs), SAMPLES, 1, steps=steps,
                               generator=torch.Generator().manual_seed(steps), progress=False)
    assert total_variation(samples, configs, probs) < 0.02


def test_purity_sampling_recovers_the_data():
    """One token revealed per step from the exact conditional: the chain rule, exact in any order."""
    configs, probs = joint_table(3, 2, seed=2)
    diffusion = MaskAndReplaceDiffusion(3, 40, "released")
    samples = diffusion.sample(Oracle(diffusion, configs, probs), SAMPLES, 2, steps=4, strategy="purity",
                               generator=torch.Generator().manual_seed(2), progress=False)
    assert total_variation(samples, configs, probs) < 0.025


@pytest.mark.parametrize("strategy,steps,tolerance", [("ancestral", 40, 0.025), ("purity", 5, 0.02)])
def test_inpainting_matches_the_true_conditional(strategy, steps, tolerance):
    configs, probs = joint_table(3, 3, seed=3)
    diffusion = MaskAndReplaceDiffusion(3, 40, "released")
    value = int(configs[probs.argmax(), 0])
    known_tokens = torch.full((SAMPLES, 3), value)
    known_mask = torch.tensor([True, False, False]).expand(SAMPLES, 3)
    samples = diffusion.sample(Oracle(diffusion, configs, probs), SAMPLES, 3, steps=steps, strategy=strategy,
                               known_tokens=known_tokens, known_mask=known_mask,
                               generator=torch.Generator().manual_seed(3), progress=False)
    assert (samples[:, 0] == value).all()
    given = configs[:, 0] == value
    conditional = probs[given] / probs[given].sum()
    assert total_variation(samples[:, 1:], configs[given][:, 1:], conditional) < tolerance


@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_masked_share_follows_the_schedule_at_every_skip_step(steps):
    """A masked x_t stays masked at s with probability gamma_bar_s / gamma_bar_t whatever the network,
    so after each exact skip step the masked share is gamma_bar_s (4 standard errors); none at the end."""
    K, T, B, N = 16, 50, 64, 256
    diffusion = MaskAndReplaceDiffusion(K, T, "released")
    times = sampling_timesteps(T, steps)[1:] + [-1]
    maps = list(diffusion.sample_iter(random_model(K), B, N, steps=steps,
                                      generator=torch.Generator().manual_seed(4)))
    assert len(maps) == steps
    for s, x in zip(times, maps):
        expected = float(diffusion.schedule.gamma_bar[s]) if s >= 0 else 0.0
        share = (x == K).double().mean().item()
        assert abs(share - expected) <= 4 * math.sqrt(expected * (1 - expected) / (B * N)) + 1e-12, (s, share)


@pytest.mark.parametrize("preset", ["released", "paper", "absorbing"])
@pytest.mark.parametrize("strategy", ["ancestral", "purity"])
def test_no_mask_remains_for_any_step_count(preset, strategy):
    K, T, B, N = 7, 20, 8, 12
    diffusion = MaskAndReplaceDiffusion(K, T, preset)
    for steps in (1, 2, 3, 7, 19, 20):
        for truncation_rate in (1.0, 0.5):
            x = diffusion.sample(random_model(K, steps), B, N, steps=steps, strategy=strategy,
                                 truncation_rate=truncation_rate, generator=torch.Generator().manual_seed(steps),
                                 progress=False)
            assert x.shape == (B, N) and x.dtype == torch.long
            assert ((x >= 0) & (x < K)).all(), (steps, truncation_rate)


def full_sort_keep(probs, rate):
    """Reference: sort each row, keep classes until the cumulative mass first reaches rate."""
    values, order = probs.sort(dim=1, descending=True)
    before = torch.cat([torch.zeros_like(values[:, :1]), values.cumsum(dim=1)[:, :-1]], dim=1)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, before < rate)


@pytest.mark.parametrize("rate", [0.3, 0.86, 0.99])
def test_truncation_equals_the_full_sort_reference(rate):
    """Peaked rows (found by the top-k) and flat rows (left to the sort), K as the COCO codebook."""
    generator = torch.Generator().manual_seed(5)
    scale = torch.tensor([8.0, 4.0, 1.0, 0.1]).repeat_interleave(64).unsqueeze(1)
    probs = (scale * torch.randn(256, 2887, generator=generator, dtype=torch.float64)).softmax(dim=1)
    keep = full_sort_keep(probs, rate)
    truncated = truncate(probs.clone(), rate)
    assert torch.equal(truncated > 0, keep)
    kept_mass = (probs * keep).sum(dim=1)
    smallest_kept = torch.where(keep, probs, 2.0).amin(dim=1)
    assert (kept_mass >= rate).all() and (kept_mass - smallest_kept < rate).all()
    assert torch.allclose(truncated, probs * keep / kept_mass.unsqueeze(1))
    assert truncate(probs.clone(), 1.0).equal(probs)


def test_sample_rows_follows_the_weights():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).expand(100_000, 6).contiguous()
    draws = sample_rows(probs, torch.Generator().manual_seed(6))
    frequencies = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert frequencies[[0, 2, 5]].sum() == 0
    assert (frequencies - probs[0].double()).abs().max() < 4 * math.sqrt(0.25 / draws.numel())


def test_guidance_temperature_and_truncation_per_token():
    K, B, N = 50, 2, 3
    generator = torch.Generator().manual_seed(7)
    cond, null = torch.randn(B, K, N, generator=generator), torch.randn(B, K, N, generator=generator)
    rows = torch.tensor([0, 4, 5])
    got = X0Distribution(cond, null, 3.0, 0.7, 1.0).rows(rows)
    batch, token = rows // N, rows % N
    guided = guide_log_probs(cond[batch, :, token].log_softmax(1), null[batch, :, token].log_softmax(1), 3.0)
    assert torch.allclose(got, (guided / 0.7).softmax(1), atol=1e-6)
    truncated = X0Distribution(cond, None, 1.0, 1.0, 0.6).rows(rows)
    assert torch.equal(truncated > 0, full_sort_keep(cond[batch, :, token].softmax(1), 0.6))


@pytest.mark.parametrize("rate", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("share", [0.3, 1.0])  # a few tokens' columns, or one pass over all
@pytest.mark.parametrize("scale", [(0.2, 12.0), (30.0, 30.0)])  # flat to sure tokens; sure only
def test_prob_at_and_purity_equal_the_processed_rows(rate, guidance_scale, share, scale):
    """p(x0 = k | x_t) per token, with truncation settled from p alone where it can (or, for most of the tokens,
    from the table of every token), equals the full row."""
    K, B, N = 300, 3, 80
    generator = torch.Generator().manual_seed(8)
    cond = torch.randn(B, K, N, generator=generator) * torch.linspace(*scale, N)
    null = torch.randn(B, K, N, generator=generator)
    null = null if guidance_scale != 1.0 else None
    x0_dist = X0Distribution(cond, null, guidance_scale, 0.8, rate)
    rows = torch.randperm(B * N, generator=generator)[: int(share * B * N)].sort().values
    probs = X0Distribution(cond, null, guidance_scale, 0.8, rate).rows(rows)
    classes = torch.where(torch.rand(rows.shape, generator=generator) < 0.5, probs.argmax(1),
                          torch.randint(K, rows.shape, generator=generator))
    expected = probs.gather(1, classes.unsqueeze(1)).squeeze(1)
    # logits of +-500 (scale 30, guided, tempered) leave exp(logit - log-normaliser) a float32 rtol of ~3e-5
    torch.testing.assert_close(x0_dist.prob_at(rows, classes), expected, atol=1e-6, rtol=1e-4)
    assert (x0_dist._table is not None) == (rate < 1.0 and share >= DENSE_SHARE)
    untruncated = X0Distribution(cond, null, guidance_scale, 0.8, 1.0).rows(rows)
    assert torch.allclose(x0_dist.purity(rows), untruncated.amax(1), atol=1e-6)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_draws_from_the_table_follow_the_truncated_rows(guidance_scale):
    """Tokens drawn from the table of every token (on CPU once most tokens are asked) follow their truncated
    p(x0 | x_t): every token of a batch row shares one column of logits, so 4 x 5,000 draws per distribution."""
    K, B, N, rate = 7, 2, 64, 0.75
    generator = torch.Generator().manual_seed(9)
    cond = (2.0 * torch.randn(B, K, 1, generator=generator)).expand(B, K, N).contiguous()
    null = torch.randn(B, K, 1, generator=generator).expand(B, K, N).contiguous()
    rows = torch.arange(B * N)
    counts = torch.zeros(B, K)
    null = null if guidance_scale != 1.0 else None
    for _ in range(79):
        x0_dist = X0Distribution(cond, null, guidance_scale, 1.0, rate)
        drawn = x0_dist.draw(rows, generator).view(B, N)
        assert x0_dist._table is not None
        counts += torch.nn.functional.one_hot(drawn, K).sum(1)
    expected = X0Distribution(cond, null, guidance_scale, 1.0, rate).rows(torch.tensor([0, N]))
    frequencies = counts / counts.sum(1, keepdim=True)
    assert torch.equal(frequencies > 0, expected > 0)  # exactly the kept classes drawn
    assert (frequencies - expected).abs().max() < 4 * math.sqrt(0.25 / (79 * N))


def test_table_of_several_blocks_per_batch_row_equals_the_sorted_reference():
    """K as the COCO codebook, so a block holds 90 tokens: blocks of sure tokens (settled by their largest class),
    of flat ones (resolved by the crossings of every block at once) and of both, in two batch rows."""
    K, B, N, rate = 2887, 2, 200, 0.86
    generator = torch.Generator().manual_seed(11)
    scale = torch.cat([torch.full((90,), 40.0), torch.full((90,), 0.3), torch.linspace(0.3, 40.0, 20)])
    cond = torch.randn(B, K, N, generator=generator) * scale
    x0_dist = X0Distribution(cond, None, 1.0, 1.0, rate)
    rows = torch.arange(B * N)
    classes = torch.randint(K, (B * N,), generator=generator)
    classes[::2] = cond.argmax(1).flatten()[::2]
    got = x0_dist.prob_at(rows, classes)
    assert x0_dist._table is not None
    probs = cond.transpose(1, 2).reshape(-1, K).softmax(1)
    keep = probs >= sorted_threshold(probs, rate)
    expected = (probs * keep / (probs * keep).sum(1, keepdim=True)).gather(1, classes.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(x0_dist._table_rows(rows) > 0, keep)


def test_class_major_and_token_major_logits_give_the_same_distribution():
    """The sampler reads logits of any memory layout (DiffusionTransformer's inference logits are a [B, K, N]
    view of [B, N, K'] memory, rows padded to K' >= K) and finds the same values; token-major ones are not copied."""
    generator = torch.Generator().manual_seed(10)
    cond, null = (3 * torch.randn(3, 100, 7, generator=generator) for _ in range(2))

    def padded(x):
        memory = torch.zeros(3, 7, 112)
        memory[..., :100] = x.transpose(1, 2)
        return memory[..., :100].transpose(1, 2)

    layouts = [(cond, null), *[tuple(f(x) for x in (cond, null)) for f in (
        lambda x: x.transpose(1, 2).contiguous().transpose(1, 2), padded)]]
    rows, classes = torch.tensor([0, 4, 5, 20]), torch.tensor([3, 0, 99, 50])
    dists = [X0Distribution(c, n, 2.0, 0.9, 0.8) for c, n in layouts]
    for method, args in (("rows", lambda: (rows,)), ("prob_at", lambda: (rows, classes)), ("scaled", tuple),
                         ("purity", lambda: (rows,)), ("draw", lambda: (rows, torch.Generator().manual_seed(1)))):
        expected = getattr(dists[0], method)(*args())
        for dist in dists[1:]:
            assert torch.equal(getattr(dist, method)(*args()), expected), method
    for dist, (c, _) in zip(dists[1:], layouts[1:]):
        assert dist.cond.data_ptr() == c.data_ptr()  # a view, no copy
    assert torch.equal(X0Distribution(layouts[2][0], None, 1.0, 1.0, 0.8).scaled(), cond)


class CountingModel:
    def __init__(self, K):
        self.K, self.batch_sizes = K, []

    def __call__(self, xt, t, text):
        self.batch_sizes.append(xt.shape[0])
        shape = torch.cos(torch.arange(self.K) * 0.37).view(1, -1, 1)
        return shape * (text.sum(dim=1, keepdim=True) + 0.1 * xt.unsqueeze(1))


@pytest.mark.parametrize("strategy", ["ancestral", "purity"])
def test_guidance_scale_one_is_unguided_and_guidance_is_one_batched_call(strategy):
    K, T, B, N = 9, 10, 4, 6
    diffusion = MaskAndReplaceDiffusion(K, T, "paper")
    cond = {"text": torch.randn(B, 3, N, generator=torch.Generator().manual_seed(8))}
    null = {"text": torch.zeros(B, 3, N)}
    runs = []
    for null_cond, scale in ((None, 1.0), (null, 1.0), (null, 4.0)):
        model = CountingModel(K)
        x = diffusion.sample(model, B, N, cond=cond, steps=5, guidance_scale=scale, null_cond=null_cond,
                             strategy=strategy, generator=torch.Generator().manual_seed(9), progress=False)
        runs.append((x, model.batch_sizes))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] == [B] * 5
    assert runs[2][1] == [2 * B] * 5 and not torch.equal(runs[0][0], runs[2][0])


def test_sampling_timesteps():
    assert sampling_timesteps(100) == list(range(99, -1, -1))
    assert sampling_timesteps(100, 10) == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]
    for steps in (1, 3, 7, 33):
        times = sampling_timesteps(100, steps)
        assert len(times) == steps and times[0] == 99 and times[-1] >= 0
        assert all(a > b for a, b in zip(times, times[1:]))


def test_bad_sampling_inputs_raise_clear_errors():
    diffusion = MaskAndReplaceDiffusion(5, 10)
    model = random_model(5)
    with pytest.raises(ValueError, match="needs null_cond"):
        diffusion.sample(model, 2, 3, guidance_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="truncation_rate"):
        diffusion.sample(model, 2, 3, truncation_rate=0.0, progress=False)
    with pytest.raises(ValueError, match="steps must lie"):
        diffusion.sample(model, 2, 3, steps=11, progress=False)
    with pytest.raises(ValueError, match="both known_tokens and known_mask"):
        diffusion.sample(model, 2, 3, known_tokens=torch.zeros(2, 3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="'sideways' is not a valid SamplingStrategy"):
        diffusion.sample(model, 2, 3, strategy="sideways", progress=False)
    with pytest.raises(ValueError, match=r"logits \[B, K, N\]"):
        diffusion.sample(lambda x, t: torch.zeros(2, 6, 3), 2, 3, progress=False)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        SamplingOptions(steps=0)
    with pytest.raises(ValueError, match="either as `options` or as keywords"):
        diffusion.sample(model, 2, 3, options=SamplingOptions(), steps=2, progress=False)


def test_an_options_object_samples_as_its_keywords():
    """`options=SamplingOptions(...)` and the same fields as keywords draw the same tokens."""
    diffusion = MaskAndReplaceDiffusion(5, 10)
    options = SamplingOptions(steps=4, truncation_rate=0.7, temperature=0.9, strategy="purity")
    draws = [diffusion.sample(random_model(5), 3, 4, generator=torch.Generator().manual_seed(2), progress=False,
                              **kwargs) for kwargs in (dict(options=options), vars(options))]
    assert options.strategy is SamplingStrategy.PURITY and torch.equal(*draws)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("table,schedule,strategy,steps,truncation", [
    ((3, 2, 4), "released", "ancestral", 40, 1.0), ((4, 1, 1), "paper", "ancestral", 7, 1.0),
    ((3, 2, 4), "released", "purity", 4, 1.0), ((3, 2, 4), "released", "ancestral", 40, 0.999)])
def test_samplers_on_cuda_recover_the_data(table, schedule, strategy, steps, truncation):
    """The GPU paths (the dense step without truncation, plain indexing, a CUDA generator) sample the same
    distribution; skip steps on one token, where a per-token oracle is exact at any step count."""
    K, N, seed = table
    configs, probs = joint_table(K, N, seed=seed)
    diffusion = MaskAndReplaceDiffusion(K, 40, schedule)
    oracle = Oracle(diffusion, configs, probs)
    samples = diffusion.sample(lambda xt, t: oracle(xt.cpu(), t.cpu()).cuda(), SAMPLES, N, steps=steps,
                               strategy=strategy, truncation_rate=truncation,
                               generator=torch.Generator("cuda").manual_seed(4), progress=False, device="cuda")
    assert samples.device.type == "cuda"
    assert total_variation(samples.cpu(), configs, probs) < 0.025


@pytest.mark.parametrize("table,schedule,steps", [((3, 2, 0), "released", 40), ((4, 1, 1), "paper", 3),
                                                  ((4, 1, 1), "paper", 40)])
def test_dense_ancestral_step_samples_the_same_distribution(monkeypatch, table, schedule, steps):
    """The GPU step (every row read, inverse CDF for all tokens) run on the CPU against the oracle."""
    from vqdiff.diffusion import discrete_sampling
    monkeypatch.setattr(discrete_sampling, "_dense", lambda device, rate: True)
    K, N, seed = table
    configs, probs = joint_table(K, N, seed=seed)
    diffusion = MaskAndReplaceDiffusion(K, 40, schedule)
    samples = diffusion.sample(Oracle(diffusion, configs, probs), SAMPLES, N, steps=steps,
                               generator=torch.Generator().manual_seed(11), progress=False)
    assert total_variation(samples, configs, probs) < 0.025


@pytest.mark.parametrize("step", ["sparse", "dense"])
@pytest.mark.parametrize("schedule", ["released", "replace-heavy"])
def test_one_ancestral_step_draws_the_posterior_mixture(step, schedule):
    """One step t -> s of both step functions against p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t)
    (checked against brute-force Bayes in test_discrete.py), at masked and content tokens; the
    replace-heavy schedule makes the weight p(x0 = x_t) of content tokens matter."""
    from vqdiff.diffusion.discrete_sampling import ancestral_step, dense_ancestral_step
    from vqdiff.diffusion.schedules import mask_and_replace_schedule
    K, N, S, t, s = 5, 4, 40_000, 12, 5
    table = "released" if schedule == "released" else mask_and_replace_schedule(20, K, 0.99, 0.0, 0.0, 0.5)
    diffusion = MaskAndReplaceDiffusion(K, 20, table)
    generator = torch.Generator().manual_seed(12)
    logits = 2 * torch.randn(1, K, N, generator=generator, dtype=torch.float64)
    xt = torch.tensor([[K, 0, 3, K]])
    expected = diffusion.p_prev(lambda x, _: logits, xt, torch.tensor([t]), s).exp()[0]  # [K+1, N]
    x0_dist = X0Distribution(logits.float().expand(S, -1, -1), None, 1.0, 1.0, 1.0)
    fn = ancestral_step if step == "sparse" else dense_ancestral_step
    out = fn(diffusion, x0_dist, xt.expand(S, -1), t, s, generator)
    frequencies = torch.nn.functional.one_hot(out, K + 1).double().mean(dim=0).T  # [K+1, N]
    assert (frequencies - expected).abs().max() < 0.01  # 4 standard errors of a frequency at S = 40k


@pytest.mark.parametrize("strategy,guidance_scale", [("ancestral", 1.0), ("ancestral", 3.0), ("purity", 3.0)])
def test_the_accelerator_path_draws_the_tokens_of_the_cpu_path(monkeypatch, strategy, guidance_scale):
    """Truncated sampling as on an accelerator (every row at once: no cache-sized blocks, no table of every token),
    run on the CPU, draws the very tokens of the CPU's blocks and table: one rule, exact in either order. K as the
    COCO codebook, so a step spans many blocks (90 tokens each) and pieces (1,452)."""
    from vqdiff.diffusion import truncation
    K, B, N = 2887, 2, 1024
    diffusion = MaskAndReplaceDiffusion(K, 100)

    def sample():
        return diffusion.sample(random_model(K, seed=3, scale=4.0), B, N, steps=4, truncation_rate=0.86,
                                guidance_scale=guidance_scale, null_cond={}, strategy=strategy,
                                generator=torch.Generator().manual_seed(5), progress=False)

    blocks, add = [], truncation.Crossings.add
    monkeypatch.setattr(truncation.Crossings, "add", lambda self, values, *args: (blocks.append(values.shape[0]),
                                                                                  add(self, values, *args)))
    on_cpu = sample()
    assert max(blocks) == truncation.CHUNK_ELEMENTS // K
    blocks.clear()
    monkeypatch.setattr(truncation, "in_cache_blocks", lambda device: False)
    assert torch.equal(sample(), on_cpu)
    assert max(blocks) > truncation.CHUNK_ELEMENTS // K  # one block of every row asked
