"""Training tasks leave the config they are given as it was; prepare_config returns the measured copy."""

import copy
from pathlib import Path

import pytest

from vqdiff.config import ConfigError, load_config
from vqdiff.train import tasks

ROOT = Path(__file__).resolve().parents[2]


def latent_config(tokenizer_dir, *extra):
    return load_config(ROOT / "configs/ddpm_shapes_latent.yaml",
                       [f"tokenizer.path={tokenizer_dir}", "data.tokens=null", "data.size=32", "data.num_samples=16",
                        "unet.ch=8", "unet.num_heads=2", "text.context_length=8", *extra])


def test_prepare_config_measures_the_latent_scale_on_a_copy(tokenizer_dir):
    cfg = latent_config(tokenizer_dir)
    before = copy.deepcopy(cfg)
    prepared = tasks.prepare_config(cfg)
    assert cfg == before and cfg.gaussian.latent_scale is None
    assert prepared.gaussian.latent_scale > 0 and prepared.unet == cfg.unet
    tasks.build_task(prepared)
    assert tasks.prepare_config(prepared) is prepared  # a set scale is kept
    with pytest.raises(ConfigError, match="latent_scale"):
        tasks.build_task(cfg)


def test_building_a_task_leaves_the_config_as_it_was(tokenizer_dir):
    cfg = latent_config(tokenizer_dir, "gaussian.latent_scale=0.5")
    before = copy.deepcopy(cfg)
    tasks.build_task(cfg)
    assert cfg == before
