"""Every shipped config loads against the schema, and the B preset has the released parameter count."""

from pathlib import Path

import pytest

from vqdiff import build
from vqdiff.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_b_preset_counts_like_the_released_model():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/coco_b.yaml")
    counts = build.parameter_counts(cfg, num_classes=2887)
    assert counts["transformer.total"] - counts["transformer.empty_text_embed"] == 388_780_871
    assert counts["text_encoder"] == 63_428_096
