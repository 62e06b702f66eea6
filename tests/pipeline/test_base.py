"""What every pipeline gets from the base: save / load round trips, options checked, batched generation."""

from pathlib import Path

import pytest
import torch

from vqdiff.config import ConfigError
from vqdiff.io.checkpoint import CheckpointError
from vqdiff.pipeline import DDPMPipeline, GaussianTextToImagePipeline, TextToImagePipeline, load_pipeline

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
PROMPTS = ["a large red circle at the top left", "a small blue square at the center", "a small green triangle"]


def test_an_unconditional_ddpm_saves_and_loads_as_a_folder(tmp_path):
    pipe = DDPMPipeline.from_pretrained(FIXTURES / "scurve_run")
    folder = pipe.save_pretrained(tmp_path / "scurve")
    again = DDPMPipeline.from_pretrained(folder)
    torch.testing.assert_close(again(n=4, seed=1, progress=False), pipe(n=4, seed=1, progress=False), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vq_pipeline", "latent_ddpm_pipeline"])
def test_a_text_pipeline_round_trips_through_save_pretrained(name, tmp_path):
    pipe = load_pipeline(FIXTURES / name)
    again = load_pipeline(pipe.save_pretrained(tmp_path / name))
    assert type(again) is type(pipe)
    for a, b in zip(pipe.network.state_dict().values(), again.network.state_dict().values()):
        assert torch.equal(a, b)


def test_options_of_another_model_type_are_refused_by_name():
    vq = load_pipeline(FIXTURES / "vq_pipeline")
    gaussian = load_pipeline(FIXTURES / "latent_ddpm_pipeline")
    assert isinstance(vq, TextToImagePipeline) and isinstance(gaussian, GaussianTextToImagePipeline)
    assert vq.sampling_options(steps=3)["steps"] == 3 and vq.sampling_options()["steps"] == vq.cfg.sample.steps
    with pytest.raises(ConfigError, match="sampler"):
        vq.sampling_options(sampler="ddim")
    with pytest.raises(ConfigError, match="truncation_rate"):
        gaussian.sampling_options(truncation_rate=0.8)
    with pytest.raises(ConfigError, match="dtype"):
        gaussian.to("cpu", torch.bfloat16)


def test_a_pipeline_refuses_a_folder_of_another_model_type():
    with pytest.raises(CheckpointError, match="not VQ-Diffusion"):
        TextToImagePipeline.from_pretrained(FIXTURES / "scurve_run")
    with pytest.raises(CheckpointError, match="no text-conditional Gaussian model"):
        GaussianTextToImagePipeline.from_pretrained(FIXTURES / "scurve_run")


def test_generate_gives_one_image_per_prompt_in_batches():
    pipe = load_pipeline(FIXTURES / "vq_pipeline")
    images = pipe.generate(PROMPTS, batch_size=2, generator=torch.Generator().manual_seed(0), desc=None, steps=2)
    first_batch = pipe(PROMPTS[:2], torch.Generator().manual_seed(0), progress=False, steps=2)
    assert len(images) == 3 and [im.tobytes() for im in images[:2]] == [im.tobytes() for im in first_batch]
