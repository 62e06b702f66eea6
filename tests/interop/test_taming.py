import csv
from pathlib import Path

import pytest
import torch

from vqdiff.interop.taming import TamingKeyError, load_taming_gumbel, to_taming_state_dict
from vqdiff.models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE

# shared/ lies beside the checkout (also in CI)
KEYS_TSV = Path(__file__).resolve().parents[3] / "shared" / "interop" / "taming_gumbel_f8_keys.tsv"
SMALL = dict(resolution=16, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[4], z_channels=16,
             norm_groups=8, embedding_dim=16, num_embeddings=64)


def small_model(seed: int = 0) -> GumbelVQVAE:
    torch.manual_seed(seed)
    return GumbelVQVAE.from_config({**GUMBEL_F8_CONFIG, **SMALL}).eval()


@pytest.fixture(scope="module")
def f8_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    # built on the CPU: faster here than the meta device, whose first use imports torch._refs (~4 s)
    model = GumbelVQVAE.from_config(GUMBEL_F8_CONFIG)
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
    return {k: tuple(v.shape) for k, v in to_taming_state_dict(model).items()}, counts


def test_full_size_f8_matches_the_released_codec(f8_shapes):
    shapes, counts = f8_shapes
    # the exact parameter counts of the released codec (VQ-Diffusion content_codec) and sample rows of its key list
    assert counts == dict(encoder=26_345_728, decoder=38_316_163, quantize=4_202_496, quant_conv=65_792,
                          post_quant_conv=65_792)
    assert len(shapes) == 301
    assert shapes["encoder.down.2.downsample.conv.weight"] == (256, 256, 3, 3)
    assert shapes["encoder.down.3.attn.1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.attn.2.q.weight"] == (512, 512, 1, 1)
    assert shapes["quantize.proj.weight"] == (8192, 256, 1, 1) and shapes["quantize.embed.weight"] == (8192, 256)
    assert "decoder.up.0.upsample.conv.weight" not in shapes and "encoder.down.3.downsample.conv.weight" not in shapes


@pytest.mark.skipif(not KEYS_TSV.is_file(), reason="needs the shared key list of the published Gumbel f8 model")
def test_full_size_f8_names_and_shapes_match_the_published_key_list(f8_shapes):
    shapes, _ = f8_shapes
    with open(KEYS_TSV) as f:
        rows = csv.DictReader(f, delimiter="\t")
        published = {row["key"]: tuple(int(s) for s in row["shape"].split("x")) for row in rows}
    assert sorted(set(published) - set(shapes)) == [] and sorted(set(shapes) - set(published)) == []
    assert {k: shapes[k] for k in published if shapes[k] != published[k]} == {}


def test_ckpt_round_trip_reproduces_outputs(tmp_path):
    source = small_model(seed=0)
    state = to_taming_state_dict(source)
    extra = {"loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4), "loss.perceptual_loss.lin0.model.1.weight":
             torch.randn(1, 64, 1, 1)}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {**state, **extra}, "global_step": 7}, path)
    loaded = load_taming_gumbel(path, config=SMALL)
    assert not loaded.training
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens = source.encode(x)
        assert torch.equal(loaded.encode(x), tokens)
        torch.testing.assert_close(loaded.decode(tokens), source.decode(tokens), rtol=0, atol=0)
    other = small_model(seed=1)
    with torch.no_grad():
        assert not torch.equal(other.decode(tokens), source.decode(tokens))  # the weights, not the seed, decide
    # a bare state dict works too
    assert torch.equal(load_taming_gumbel(state, config=SMALL).encode(x), tokens)


def test_wrong_names_and_shapes_are_listed():
    state = to_taming_state_dict(small_model())
    state["encoder.conv_inn.weight"] = state.pop("encoder.conv_in.weight")
    del state["quantize.embed.weight"]
    state["post_quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(TamingKeyError) as error:
        load_taming_gumbel(state, config=SMALL)
    message = str(error.value)
    for expected in ("missing: encoder.conv_in.weight", "missing: quantize.embed.weight",
                     "unexpected: encoder.conv_inn.weight", "shape mismatch: post_quant_conv.bias"):
        assert expected in message
    with pytest.raises(TamingKeyError, match="shape mismatch: quantize.proj.weight"):
        load_taming_gumbel(to_taming_state_dict(small_model()), config={**SMALL, "num_embeddings": 32})


def test_trimmed_model_has_no_taming_form_and_pickles_are_refused(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="trimmed"):
        to_taming_state_dict(model.keep_codes(torch.arange(4)))
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": to_taming_state_dict(model), "callback": GumbelVQVAE}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_taming_gumbel(path, config=SMALL)
