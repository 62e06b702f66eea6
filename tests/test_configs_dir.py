"""Every shipped config loads against the schema, and the B preset has the released parameter count."""

from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("config", ["shapes_tiny", "ddpm_shapes"])
@pytest.mark.parametrize("normalize,scale,norm", [(True, 1.0, 1.0), (True, 16.0, 16.0), (False, 1.0, 256 ** 0.5)])
def test_null_text_starts_at_the_scale_of_the_text_features(config, normalize, scale, norm):
    """The learned unconditional input (transformer or UNet) begins with the per-token norm of real captions'
    features (feature_scale when L2-normalised, about sqrt(width) for raw layer-norm outputs): no scale jump on a
    drop."""
    cfg = load_config(Path(__file__).resolve().parents[1] / f"configs/{config}.yaml",
                      [f"text.normalize={normalize}", f"text.feature_scale={scale}"])
    if config == "ddpm_shapes":
        model = build.build_ddpm_model(cfg)
    else:
        model = build.build_vq_model(cfg, num_classes=16, grid_size=(8, 8))
    with torch.no_grad():
        features, mask = model.text_encoder(["a large red circle at the top left", "a small blue square at the top"])
    null_text, = [p for name, p in model.network.named_parameters() if name in ("empty_text_embed", "null_text_embed")]
    real = features[mask].norm(dim=-1).mean()
    null = null_text.detach().norm(dim=-1).mean()
    assert real == pytest.approx(norm, rel=0.05)
    assert null == pytest.approx(real.item(), rel=0.15)


@pytest.mark.parametrize("config", ["shapes_tiny", "ddpm_shapes_latent"])
def test_counts_read_k_and_grid_from_a_trained_tokenizer(config, tokenizer_dir):
    """`vqdiff info` on a config whose tokenizer exists (a real module, loaded outside the meta device): K = 16
    and a 4x downsampling (8x8 tokens of 32 px) come from it, not from the config."""
    cfg = load_config(Path(__file__).resolve().parents[1] / f"configs/{config}.yaml",
                      [f"tokenizer.path={tokenizer_dir}", "data.size=32"])
    counts = build.parameter_counts(cfg)
    if config == "shapes_tiny":
        width = cfg.transformer.width
        assert counts["transformer.to_logits"] == (width + 1) * 16 + 2 * width  # layer norm + linear to K = 16
        # K + 1 token embeddings ([MASK] too) and row and column embeddings of an 8x8 grid
        assert counts["transformer.content_emb"] == (16 + 1) * width + 2 * 8 * width
    else:
        assert counts["unet"] > 0 and counts["text_encoder"] > 0


def test_shapes_config_starts_attention_at_one_over_sqrt_width():
    """configs/shapes.yaml's `transformer.qk_init_std` reaches every attention's query and key projections."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/shapes.yaml")
    assert cfg.transformer.qk_init_std == pytest.approx(cfg.transformer.width ** -0.5)
    torch.manual_seed(0)
    network = build.build_vq_model(cfg, num_classes=16, grid_size=(8, 8)).network
    for block in network.blocks:
        for layer in (block.attn1.query, block.attn1.key, block.attn2.query, block.attn2.key):
            assert layer.weight.std().item() == pytest.approx(cfg.transformer.qk_init_std, rel=0.03)
        assert block.attn2.value.weight.std().item() == pytest.approx(0.02, rel=0.03)
