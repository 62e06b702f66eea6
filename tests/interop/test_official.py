"""Released VQ-Diffusion checkpoints: the key layout of the B files, exact logits against diffusers' port of the
released network, and safe reading."""

import csv
import re
from pathlib import Path

import pytest
import torch

from vqdiff.interop.official import OfficialCheckpointError, load_transformer, network_state, read_checkpoint

# shared/ lies beside the checkout (also in CI)
KEYS_TSV = Path(__file__).resolve().parents[3] / "shared" / "interop" / "official_coco_keys.tsv"


def released_shapes() -> dict[str, tuple[int, ...]]:
    with open(KEYS_TSV) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {row["key"]: tuple(int(n) for n in row["shape"].split("x")) for row in rows}


@pytest.mark.skipif(not KEYS_TSV.exists(), reason="the shared interop notes are not beside this checkout")
def test_the_released_b_key_list_loads_into_the_b_network():
    """Every transformer key of the COCO/CUB/CC files (learnable variant), built on the meta device."""
    shapes = released_shapes()
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in shapes.items()}
        model = load_transformer(state)
    network = sum(p.numel() for name, p in model.named_parameters() if name != "empty_text_embed")
    assert network == 388_780_871
    assert model.empty_text_embed.shape == (77, 512) and not model.mask_text_padding
    assert (model.num_classes, model.grid_size, model.text_dim, len(model.blocks)) == (2887, (32, 32), 512, 19)
    ema = {key[len("transformer."):]: value for key, value in state.items() if key.startswith("transformer.")}
    with torch.device("meta"):
        assert load_transformer(ema).empty_text_embed is not None  # the EMA dict, prefix removed
        del state["transformer.empty_text_embed"]
        assert load_transformer(state).empty_text_embed is None  # a non-learnable file


# diffusers' port of the released network (scripts/convert_vq_diffusion_to_diffusers.py), reversed
DIFFUSERS_TO_OFFICIAL = [
    (r"^latent_image_embedding\.", "content_emb."), (r"^transformer_blocks\.(\d+)\.", r"blocks.\1."),
    (r"\.norm1\.", ".ln1."), (r"\.norm2\.", ".ln1_1."), (r"\.norm3\.", ".ln2."),
    (r"\.to_q\.", ".query."), (r"\.to_k\.", ".key."), (r"\.to_v\.", ".value."), (r"\.to_out\.0\.", ".proj."),
    (r"\.ff\.net\.0\.proj\.", ".mlp.0."), (r"\.ff\.net\.2\.", ".mlp.2."),
    (r"^norm_out\.", "to_logits.0."), (r"^out\.", "to_logits.1."),
]


def official_name(key: str) -> str:
    for pattern, replacement in DIFFUSERS_TO_OFFICIAL:
        key = re.sub(pattern, replacement, key)
    return "transformer.transformer." + key


def test_converted_network_gives_diffusers_log_probabilities():
    diffusers = pytest.importorskip("diffusers")
    K, side, T, text_dim = 33, 8, 10, 32
    torch.manual_seed(0)
    reference = diffusers.Transformer2DModel(
        num_attention_heads=4, attention_head_dim=16, num_layers=2, cross_attention_dim=text_dim,
        num_vector_embeds=K + 1, sample_size=side, num_embeds_ada_norm=T, attention_bias=True,
        activation_fn="geglu-approximate", norm_type="ada_norm").eval()
    with torch.no_grad():
        for tensor in reference.state_dict().values():  # every table and norm, not just the linears
            tensor.copy_(torch.randn_like(tensor) * 0.3)
    state = {official_name(k): v for k, v in reference.state_dict().items()}
    for i in range(2):
        state[f"transformer.transformer.blocks.{i}.attn2.mask"] = torch.ones(1, 1, 64, 64).tril()
    state["transformer.log_cumprod_at"] = torch.zeros(T + 1)  # schedule buffers beside the network are skipped
    model = load_transformer(state, num_heads=4).eval()

    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, K + 1, (3, side * side), generator=generator)
    t = torch.tensor([0, 4, T - 1])
    text = torch.randn(3, 77, text_dim, generator=generator)
    with torch.no_grad():
        ours = torch.log_softmax(model(x, t, text=text).double(), dim=1)
        # diffusers' AdaLayerNorm takes one scalar timestep per call
        theirs = torch.cat([reference(x[i:i + 1], encoder_hidden_states=text[i:i + 1], timestep=t[i]).sample
                            for i in range(3)])
    assert theirs.shape == ours.shape == (3, K, side * side)
    assert (ours - theirs.double()).abs().max() <= 1e-4


def test_bad_state_dicts_and_files_are_named(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="not a VQ-Diffusion transformer"):
        network_state({"encoder.conv_in.weight": torch.zeros(1)})
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in released_shapes().items()} if KEYS_TSV.exists() else None
    if state is not None:
        del state["transformer.transformer.blocks.3.mlp.2.bias"]
        state["transformer.transformer.blocks.0.extra.weight"] = torch.zeros(1)
        with torch.device("meta"), pytest.raises(OfficialCheckpointError,
                                                 match=r"missing: blocks\.3\.mlp\.2\.bias; unexpected: blocks\.0"):
            load_transformer(state)
    with pytest.raises(OfficialCheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "solver": Path("x")}, path)  # a Python object beside the tensors
    with pytest.raises(OfficialCheckpointError, match="--trust-pickle"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust_pickle=True)["solver"] == Path("x")
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"a": torch.ones(2)}, "last_epoch": 3}, plain)
    assert read_checkpoint(plain)["last_epoch"] == 3


def test_codec_decodes_the_released_trimmed_ids_as_the_full_codes():
    from vqdiff.interop.official import load_codec
    from vqdiff.models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE
    small = dict(resolution=16, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[4], z_channels=16,
                 norm_groups=8, embedding_dim=16, num_embeddings=64)
    torch.manual_seed(0)
    codec = GumbelVQVAE.from_config({**GUMBEL_F8_CONFIG, **small}).eval()
    state = {}
    for key, value in codec.state_dict().items():
        part = "dec" if key.startswith(("decoder.", "post_quant_conv.")) else "enc"
        state[f"content_codec.{part}.{key}"] = value
        if key.startswith("quantize."):  # the released files hold the shared quantizer twice
            state[f"content_codec.dec.{key}"] = value
    used = torch.tensor([3, 9, 10, 17, 40, 63])
    codes_map = torch.zeros(64, dtype=torch.long)
    codes_map[used] = torch.arange(1, 7)  # as taming_vqvae_2887.pt: used codes -> 1..n, the rest -> 0
    trimmed = load_codec(state, codes_map, small)
    assert trimmed.num_embeddings == 7 and trimmed.code_map.tolist() == [0, 3, 9, 10, 17, 40, 63]
    ids = torch.randint(0, 7, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    full = torch.tensor([0, 3, 9, 10, 17, 40, 63])[ids]
    with torch.no_grad():
        torch.testing.assert_close(trimmed.decode(ids), codec.decode(full), rtol=0, atol=0)
    state["content_codec.dec.quantize.embed.weight"] = state["content_codec.dec.quantize.embed.weight"] + 1
    with pytest.raises(OfficialCheckpointError, match="two copies of quantize.embed.weight differ"):
        load_codec(state, codes_map, small)
    with pytest.raises(OfficialCheckpointError, match="not a whole-model"):
        load_codec({"transformer.content_emb.emb.weight": torch.zeros(2, 2)})
