"""Released VQ-Diffusion checkpoints: the key layouts of the B and ITHQ files, exact logits against diffusers' port
of the released network, safe reading, the CLIP text tower, both codecs and `vqdiff convert official` end to end
on small fake files (no released file is needed)."""

import csv
import re
from pathlib import Path

import pytest
import torch

from vqdiff.cli import main
from vqdiff.interop.official import (OfficialCheckpointError, load_codec, load_ithq_codec,
                                     load_official, load_text_encoder, load_transformer, network_state,
                                     official_pipeline, read_checkpoint)
from vqdiff.models.patch_vqgan import ITHQ_CONFIG, PatchVQGAN
from vqdiff.models.transformer import DiffusionTransformer
from vqdiff.pipeline import TextToImagePipeline

# shared/ lies beside the checkout (also in CI)
KEYS_TSV = Path(__file__).resolve().parents[3] / "shared" / "interop" / "official_coco_keys.tsv"


def released_shapes(tsv: Path = KEYS_TSV) -> dict[str, tuple[int, ...]]:
    with open(tsv) as f:
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
        with torch.device("meta"), pytest.raises(OfficialCheckpointError) as error:
            load_transformer(state)
        assert "missing: blocks.3.mlp.2.bias" in str(error.value)
        assert "unexpected: blocks.0.extra.weight" in str(error.value)
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


# ---- the CLIP text tower ---------------------------------------------------------------------------------------

ITHQ_TSV = KEYS_TSV.with_name("official_ithq_keys.tsv")
HALF = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj", "text_projection")  # float16 in the files


def clip_tower(seed: int):
    """A small OpenAI-layout text tower (QuickGELU), its linears rounded through float16 as the files hold them."""
    import open_clip
    torch.manual_seed(seed)
    tower = open_clip.transformer.TextTransformer(width=64, layers=2, heads=8, output_dim=64,
                                                  act_layer=open_clip.transformer.QuickGELU).eval()
    with torch.no_grad():
        for name, tensor in tower.state_dict().items():
            tensor.copy_(torch.randn_like(tensor) * 0.1 if name != "attn_mask" else tensor)
            if any(part in name for part in HALF):
                tensor.copy_(tensor.half().float())
    return tower


def clip_state(tower, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value.half() if any(part in key for part in HALF) else value.clone()
            for key, value in tower.state_dict().items()}


def tower_features(tower, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = tower.transformer(tower.token_embedding(ids) + tower.positional_embedding, attn_mask=tower.attn_mask)
        return torch.nn.functional.normalize(tower.ln_final(x), dim=-1)


def test_text_tower_loads_from_both_prefixes_as_float32():
    tower = clip_tower(0)
    for prefix in ("transformer.condition_emb.", "condition_emb."):
        encoder = load_text_encoder(clip_state(tower, prefix))
        assert encoder.arch == "clip-text-w64-l2-h8-quickgelu" and not encoder.trainable
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in encoder.parameters())
        ids, _ = encoder.tokenize(["a red circle", ""])
        torch.testing.assert_close(encoder(["a red circle", ""])[0], tower_features(tower, ids), rtol=0, atol=1e-6)
    state = clip_state(tower, "condition_emb.")
    del state["condition_emb.ln_final.bias"]
    state["condition_emb.transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(OfficialCheckpointError) as error:
        load_text_encoder(state)
    assert "missing: ln_final.bias" in str(error.value)
    assert "unexpected: transformer.resblocks.0.attn.extra" in str(error.value)
    with pytest.raises(OfficialCheckpointError, match="no CLIP text tower"):
        load_text_encoder({"transformer.content_emb.emb.weight": torch.zeros(2, 2)})


@pytest.mark.skipif(not KEYS_TSV.exists(), reason="the shared interop notes are not beside this checkout")
def test_the_released_clip_key_list_is_openai_vit_b_32():
    with torch.device("meta"):
        state = {key: torch.empty(shape) for key, shape in released_shapes().items()}
        encoder = load_text_encoder(state)
    assert encoder.arch == "ViT-B-32-quickgelu" and encoder.dim == 512
    assert sum(p.numel() for p in encoder.parameters()) == 63_428_096


# ---- ITHQ's PatchVQGAN ---------------------------------------------------------------------------------------

# ITHQ's layout (4 levels, 2 + 3 blocks per level, attention at the last) at a quarter of the width
ITHQ_SMALL = dict(ITHQ_CONFIG, ch=32, z_channels=64, embedding_dim=16, num_embeddings=48)


def ithq_codec_state(codec: PatchVQGAN) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in codec.state_dict().items():
        part = "dec" if key.startswith(("decoder.", "post_quant_conv.")) else "enc"
        state[f"content_codec.{part}.{key}"] = value.clone()
        if key.startswith("quantize."):  # one quantizer, stored under both, with its EMA statistics
            state[f"content_codec.dec.{key}"] = value.clone()
    for part in ("enc", "dec"):
        state[f"content_codec.{part}.quantize.cluster_size"] = torch.ones(codec.num_embeddings)
        state[f"content_codec.{part}.quantize.embedding_avg"] = codec.quantize.embedding.clone()
    return state


def small_ithq(seed: int, config=ITHQ_SMALL) -> PatchVQGAN:
    torch.manual_seed(seed)
    codec = PatchVQGAN.from_config(config).eval()
    with torch.no_grad():
        codec.quantize.embedding.normal_()
    return codec


@pytest.mark.skipif(not ITHQ_TSV.exists(), reason="the shared interop notes are not beside this checkout")
def test_ithq_codec_names_and_shapes():
    published = {key: shape for key, shape in released_shapes(ITHQ_TSV).items() if key.startswith("content_codec.")}
    with torch.device("meta"):
        codec = load_ithq_codec({key: torch.empty(shape) for key, shape in published.items()})
    assert codec.config == ITHQ_CONFIG  # every size read back from the shapes
    counts = [sum(p.numel() for p in part.parameters())
              for part in (codec.encoder, codec.decoder, codec.quant_conv, codec.post_quant_conv)]
    assert counts == [25_724_608, 37_694_851, 32_896, 33_024]
    small = ithq_codec_state(small_ithq(0))
    assert set(small) == set(published)  # the reduced model keeps every released name


def test_ithq_codec_round_trip_and_brute_force_quantizer(tmp_path):
    source = small_ithq(0)
    state = ithq_codec_state(source)
    codec = load_ithq_codec(state)
    assert codec.config == ITHQ_SMALL and codec.downsample_factor == 8
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        tokens = codec.encode(images)
        assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.int64
        # nearest code in float64, straight from the file's codebook
        z = codec.quant_conv(codec.encoder(images)).double().permute(0, 2, 3, 1)  # [B, h, w, D]
        codebook = state["content_codec.enc.quantize.embedding"].double()
        assert torch.equal(tokens, (z[..., None, :] - codebook).pow(2).sum(-1).argmin(-1))
        decoded = codec.decode(tokens)
        assert decoded.shape == images.shape and decoded.abs().max() <= 1
        # decoding: the file's codebook rows through its post_quant_conv, then the decoder
        latent = torch.nn.functional.conv2d(codebook[tokens].permute(0, 3, 1, 2),
                                            state["content_codec.dec.post_quant_conv.weight"].double(),
                                            state["content_codec.dec.post_quant_conv.bias"].double())
        torch.testing.assert_close(codec.post_quant_conv(codec.embed_tokens(tokens)).double(), latent,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(decoded, codec.decoder(latent.float()).clamp(-1, 1), rtol=1e-4, atol=1e-4)
        assert torch.equal(decoded, source.decode(tokens))
    from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
    loaded = load_tokenizer(save_tokenizer(codec, tmp_path / "tok"))
    assert isinstance(loaded, PatchVQGAN)
    with torch.no_grad():
        assert torch.equal(loaded.decode(tokens), decoded)
    state["content_codec.dec.quantize.embedding"] = state["content_codec.dec.quantize.embedding"] + 1
    with pytest.raises(OfficialCheckpointError, match="two copies of quantize.embedding differ"):
        load_ithq_codec(state)
    with pytest.raises(OfficialCheckpointError, match="load_codec"):
        load_ithq_codec(gumbel_codec_state(small_gumbel()))


# ---- `vqdiff convert official` on a small fake released file ---------------------------------------------------

SIDE, STEPS, USED = 4, 10, torch.tensor([3, 9, 10, 17, 40, 63])  # 7 token ids: 0 and the 6 used codes
GUMBEL_SMALL = dict(resolution=64, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[32], z_channels=32,
                    embedding_dim=16, num_embeddings=64)  # 32 GroupNorm groups, as taming


def small_gumbel():
    from vqdiff.models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE
    torch.manual_seed(0)
    return GumbelVQVAE.from_config({**GUMBEL_F8_CONFIG, **GUMBEL_SMALL}).eval()


def small_network(seed: int, num_classes: int) -> DiffusionTransformer:
    torch.manual_seed(seed)
    network = DiffusionTransformer(num_classes, 32, 2, 16, grid_size=(SIDE, SIDE), text_dim=64, num_steps=STEPS,
                                   time_embedding="table", mlp_activation="quick_gelu", mask_text_padding=False,
                                   null_text_embedding=True)
    with torch.no_grad():
        for tensor in network.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.3)
    return network


def ema_layout(network, tower, learnable: bool = True) -> dict[str, torch.Tensor]:
    """The DiffusionTransformer's state dict as `ckpt["ema"]` holds it (`model` adds the prefix `transformer.`)."""
    state = {f"transformer.{k}": v for k, v in network.state_dict().items() if k != "empty_text_embed"}
    for i in range(len(network.blocks)):
        state[f"transformer.blocks.{i}.attn2.mask"] = torch.ones(1, 1, SIDE ** 2, SIDE ** 2).tril()
    state.update(clip_state(tower, "condition_emb."))
    for name in ("log_at", "log_cumprod_at", "Lt_history", "Lt_count"):
        state[name] = torch.zeros(STEPS)
    if learnable:
        state["empty_text_embed"] = network.empty_text_embed.detach().double()
    return state


def codes_map_file(path: Path) -> Path:
    codes_map = torch.zeros(64, dtype=torch.long)
    codes_map[USED] = torch.arange(1, 7)
    torch.save(codes_map, path)
    return path


def released_file(path: Path, codec_state: dict, num_classes: int, learnable: bool = True, **extra) -> dict:
    """A small file in the released container: trained weights (seed 0) in `model`, EMA weights (seed 1) in `ema`."""
    trained = ema_layout(small_network(0, num_classes), clip_tower(0), learnable)
    ema = ema_layout(small_network(1, num_classes), clip_tower(1), learnable)
    checkpoint = {"model": {**codec_state, **{f"transformer.{k}": v for k, v in trained.items()}}, "ema": ema,
                  "last_epoch": 3, "last_iter": 300, **extra}
    torch.save(checkpoint, path)
    return checkpoint


def gumbel_codec_state(codec) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in codec.state_dict().items():
        part = "dec" if key.startswith(("decoder.", "post_quant_conv.")) else "enc"
        state[f"content_codec.{part}.{key}"] = value
        if key.startswith("quantize."):
            state[f"content_codec.dec.{key}"] = value
    return state


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    checkpoint = released_file(root / "coco_learnable.pth", gumbel_codec_state(small_gumbel()), num_classes=7)
    return root, checkpoint, codes_map_file(root / "taming_vqvae_7.pt")


def logits(network, generator_seed: int = 2):
    generator = torch.Generator().manual_seed(generator_seed)
    x = torch.randint(0, network.num_classes + 1, (2, SIDE * SIDE), generator=generator)
    text = torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():  # in eval mode, as pipelines run it (training writes its logits in another layout)
        return network.eval()(x, torch.tensor([0, STEPS - 1]), text=text)


def test_convert_writes_a_pipeline_that_matches_the_file(coco_like, tmp_path):
    from safetensors import safe_open
    root, checkpoint, codes_map = coco_like
    out = tmp_path / "coco"
    assert main(["convert", "official", str(root / "coco_learnable.pth"), "--out", str(out),
                 "--codes-map", str(codes_map)]) == 0
    pipe = TextToImagePipeline.from_pretrained(out)
    cfg = pipe.cfg
    assert (cfg.transformer.time_embedding, cfg.transformer.mlp_activation, cfg.transformer.mask_text_padding) == \
        ("table", "quick_gelu", False)
    assert cfg.transformer.null_text_embedding and cfg.discrete.num_timesteps == STEPS
    assert cfg.discrete.schedule == "released"
    assert (cfg.text.arch, cfg.text.weights, cfg.text.trainable) == \
        ("clip-text-w64-l2-h8-quickgelu", "text_encoder.safetensors", False)
    assert not any(p.requires_grad for p in pipe.model.text_encoder.parameters())
    with safe_open(str(out / "transformer.safetensors"), "pt") as file:
        assert not [k for k in file.keys() if k.endswith("attn2.mask") or k.startswith(("log_", "Lt_"))]
    # EMA weights by default: logits, text features and the learned null text of `ema`
    torch.testing.assert_close(logits(pipe.model.network), logits(load_transformer(checkpoint["ema"])), rtol=0, atol=0)
    prompts = ["a red circle", ""]
    ids, _ = pipe.model.text_encoder.tokenize(prompts)
    torch.testing.assert_close(pipe.model.text_encoder(prompts)[0], tower_features(clip_tower(1), ids),
                               rtol=0, atol=1e-6)
    assert torch.equal(pipe.model.network.empty_text_embed, checkpoint["ema"]["empty_text_embed"].float())
    # the codec from `model`, trimmed by the codes map
    tokens = torch.randint(0, 7, (2, SIDE, SIDE), generator=torch.Generator().manual_seed(3))
    reference = load_codec(checkpoint["model"], codes_map)
    with torch.no_grad():
        assert torch.equal(pipe.tokenizer.decode(tokens), reference.decode(tokens))
    assert main(["sample", "a red circle", "--model", str(out), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_weights_model_takes_the_trained_tensors(coco_like, tmp_path):
    root, checkpoint, codes_map = coco_like
    cfg, tokenizer, network, text_encoder = load_official(root / "coco_learnable.pth", codes_map, weights="model")
    trained = logits(load_transformer(checkpoint["model"]))
    torch.testing.assert_close(logits(network), trained, rtol=0, atol=0)
    assert not torch.allclose(trained, logits(load_transformer(checkpoint["ema"])))
    ids, _ = text_encoder.tokenize(["a red circle"])
    torch.testing.assert_close(text_encoder(["a red circle"])[0], tower_features(clip_tower(0), ids),
                               rtol=0, atol=1e-6)
    assert cfg.sample.guidance_scale == 5.0  # the learned null text's README setting


def test_null_text_follows_the_key_and_bad_files_are_refused(tmp_path, caplog):
    codec = gumbel_codec_state(small_gumbel())
    path = tmp_path / "coco_pretrained.pth"
    released_file(path, codec, num_classes=7, learnable=False)
    cfg, _, network, _ = load_official(path, codes_map_file(tmp_path / "map.pt"))
    assert network.empty_text_embed is None and not cfg.transformer.null_text_embedding
    assert (cfg.sample.truncation_rate, cfg.sample.guidance_scale) == (0.86, 1.0)
    with pytest.raises(OfficialCheckpointError, match="pass the released codes map"):
        load_official(path)
    # a Python object in the file: refused with the flag to pass, read with it
    pickled = tmp_path / "pickled.pth"
    released_file(pickled, codec, num_classes=7, solver=Path("x"))
    out = tmp_path / "out"
    assert main(["convert", "official", str(pickled), "--out", str(out), "--codes-map", str(tmp_path / "map.pt")]) == 2
    assert "--trust-pickle" in caplog.text and not out.exists()
    assert main(["convert", "official", str(pickled), "--out", str(out), "--codes-map", str(tmp_path / "map.pt"),
                 "--trust-pickle"]) == 0
    # missing and unexpected keys are named
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["ema"]["transformer.blocks.1.mlp.2.bias"]
    checkpoint["ema"]["transformer.blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, path)
    with pytest.raises(OfficialCheckpointError) as error:
        official_pipeline(path, tmp_path / "map.pt")
    assert "missing: blocks.1.mlp.2.bias" in str(error.value)
    assert "unexpected: blocks.0.extra.weight" in str(error.value)
    del checkpoint["ema"]
    torch.save(checkpoint, path)
    with pytest.raises(OfficialCheckpointError, match="no ema entry.*--weights model"):
        official_pipeline(path, tmp_path / "map.pt")


def test_ithq_like_file_converts_with_its_patch_vqgan(tmp_path):
    config = dict(ITHQ_SMALL, ch_mult=[1, 2], resolution=64)  # f2: 8x8 images for the 4x4 grid
    codec = small_ithq(0, config)
    path = tmp_path / "ithq_learnable.pth"
    released_file(path, ithq_codec_state(codec), num_classes=codec.num_embeddings)
    with pytest.raises(OfficialCheckpointError, match="takes no codes map"):
        load_official(path, codes_map=torch.zeros(48, dtype=torch.long))
    saved = official_pipeline(path).save_pretrained(tmp_path / "ithq")
    pipe = TextToImagePipeline.from_pretrained(saved)
    assert isinstance(pipe.tokenizer, PatchVQGAN) and pipe.cfg.data.size == 8
    tokens = torch.randint(0, 48, (2, SIDE, SIDE), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(pipe.tokenizer.decode(tokens), codec.decode(tokens))
    assert len(pipe(["a teddy bear"], steps=2, progress=False)) == 1
