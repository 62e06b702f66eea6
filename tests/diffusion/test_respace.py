"""Respacing: which steps are kept, the recomputed schedule, and the timesteps the network sees."""

import pytest
import torch

from vqdiff.diffusion.gaussian import GaussianDiffusion
from vqdiff.diffusion.respace import respace_betas, space_timesteps
from vqdiff.diffusion.schedules import beta_schedule


def test_space_timesteps_known_outputs():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))
    assert space_timesteps(10, "5") == [0, 2, 4, 7, 9]  # stride 9/4 rounded, both ends kept
    assert space_timesteps(10, 5) == space_timesteps(10, "5") == space_timesteps(10, [5])
    assert space_timesteps(300, "3,1,2") == [0, 50, 99, 100, 200, 299]
    assert space_timesteps(10, "1,1,1") == [0, 4, 7]  # sections of 4, 3, 3 steps: the remainder goes first
    assert space_timesteps(7, "7") == list(range(7))


@pytest.mark.parametrize("spec, count", [(50, 50), ("250", 250), ("10,15,20", 45), ("ddim25", 25), ("ddim40", 40)])
def test_space_timesteps_count_order_and_endpoints(spec, count):
    steps = space_timesteps(1000, spec)
    assert len(steps) == count and steps == sorted(set(steps))
    assert steps[0] == 0 and 0 <= steps[-1] <= 999
    if not str(spec).startswith("ddim"):
        assert steps[-1] == 999  # the last section always ends on the last step


@pytest.mark.parametrize("spec", ["ddim999", "2000", "10,0", "abc", "ddimx", "", 0])
def test_space_timesteps_rejects_impossible_requests(spec):
    with pytest.raises(ValueError, match="space_timesteps"):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spec", [50, "ddim10", "3,7,20", [0, 1, 2, 500, 998]])
def test_respaced_alpha_bar_equals_the_original_at_kept_steps(schedule, spec):
    diffusion = GaussianDiffusion(beta_schedule(schedule, 1000))
    respaced = diffusion.respace(spec)
    kept = respaced.timestep_map
    assert respaced.num_timesteps == len(kept) and respaced.original_num_timesteps == 1000
    torch.testing.assert_close(respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-9, atol=0)
    assert respaced.betas.dtype == torch.float64 and ((respaced.betas > 0) & (respaced.betas < 1)).all()
    # each respaced step jumps over the skipped ones: 1 - beta_i is the product of the original alphas
    previous = torch.cat([torch.tensor([-1]), kept[:-1]])
    for i in (0, len(kept) // 2, len(kept) - 1):
        alphas = 1 - diffusion.betas[previous[i] + 1: kept[i] + 1]
        torch.testing.assert_close(1 - respaced.betas[i], alphas.prod(), rtol=1e-9, atol=0)


def test_respacing_every_step_changes_nothing():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    same = diffusion.respace(100)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(same, name), getattr(diffusion, name), rtol=1e-10, atol=1e-15)
    assert torch.equal(same.timestep_map, torch.arange(100))


def test_respacing_composes():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    twice = diffusion.respace("ddim100").respace([0, 10, 50, 99])
    assert twice.timestep_map.tolist() == [0, 100, 500, 990]
    torch.testing.assert_close(twice.alphas_cumprod, diffusion.alphas_cumprod[[0, 100, 500, 990]], rtol=1e-12,
                               atol=0)


def test_respace_betas_validates_its_steps():
    alphas_cumprod = torch.cumprod(1 - beta_schedule("linear", 100), 0)
    with pytest.raises(ValueError, match="no timesteps"):
        respace_betas(alphas_cumprod, [])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        respace_betas(alphas_cumprod, [0, 100])
    assert respace_betas(alphas_cumprod, [5, 3, 3]).shape == (2,)  # sorted and deduplicated


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("rescale", [False, True])
def test_the_model_sees_original_timesteps(sampler, rescale):
    diffusion = GaussianDiffusion(beta_schedule("linear", 200), rescale_timesteps=rescale)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    diffusion.sample(model, (3, 2), steps="10,5", sampler=sampler, progress=False,
                     generator=torch.Generator().manual_seed(0))
    kept = space_timesteps(200, "10,5")
    want = [float(s) * 1000 / 200 if rescale else s for s in reversed(kept)]
    assert [t[0].item() for t in seen] == want
    assert all(t.dtype == (torch.float32 if rescale else torch.long) and t.shape == (3,) for t in seen)
    seen.clear()
    diffusion.respace(kept).training_losses(model, torch.zeros(3, 2), torch.tensor([0, 1, 14]))
    assert seen[0].tolist() == [kept[i] * (5.0 if rescale else 1) for i in (0, 1, 14)]
