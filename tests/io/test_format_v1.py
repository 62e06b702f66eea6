"""Folders written by an earlier vqdiff (tests/fixtures/format_v1, commit 5833426) still load and sample what
they sampled then."""

from pathlib import Path

import numpy as np
import pytest
import torch

from vqdiff.pipeline import DDPMPipeline, load_pipeline

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
PROMPTS = ["a large red circle at the top left", "a small blue square at the center"]


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURES / "expected.npz"))


@pytest.mark.parametrize("name,key", [("vq_pipeline", "vq"), ("latent_ddpm_pipeline", "latent_ddpm")])
def test_saved_pipeline_folder_loads_and_samples_as_before(name, key, expected):
    pipe = load_pipeline(FIXTURES / name)
    images = np.stack([np.asarray(im) for im in pipe(PROMPTS, torch.Generator().manual_seed(0), progress=False)])
    assert images.shape == expected[key].shape
    # the same draws through the same weights: equal up to float rounding of a changed operation order
    assert np.abs(images.astype(int) - expected[key]).mean() < 0.5


def test_saved_run_checkpoint_loads_and_samples_as_before(expected):
    pipe = DDPMPipeline.from_pretrained(FIXTURES / "scurve_run")
    points = pipe(n=8, seed=0, progress=False).numpy()
    np.testing.assert_allclose(points, expected["scurve"], atol=1e-4)
