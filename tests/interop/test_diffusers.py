"""vqdiff pipeline directories <-> diffusers VQDiffusionPipeline folders: exact parts both ways, offline."""

import logging
import shutil
import sys

import pytest
import torch

from vqdiff import build, cli
from vqdiff.config import load_config
from vqdiff.interop.diffusers import (DiffusersConversionError, codec_from_diffusers, codec_to_diffusers,
                                      export_pipeline, require_diffusers, text_to_diffusers, transformer_to_diffusers)
from vqdiff.models.text import CLIPTextEncoder
from vqdiff.models.patch_vqgan import PatchVQGAN
from vqdiff.models.vqvae import GumbelVQVAE
from vqdiff.pipeline import TextToImagePipeline
from vqdiff.io.tokenizer import save_tokenizer

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a large red circle at the top left", "Hello, World! it's 3 o'clock", ""]
VARIANTS = {
    # a trimmed codec with attention at 8x8, erf-GELU MLP, learned per-step AdaLN tables, learned null text
    "table": dict(codec=dict(z_channels=16, embedding_dim=16, attn_resolutions=(8,)), keep=16,
                  overrides=["transformer.mlp_activation=gelu", "transformer.time_embedding=table",
                             "transformer.null_text_embedding=true"]),
    # the released activation, a sinusoidal AdaLN (exported as its table), no null text, codebook width != z
    "sinusoidal": dict(codec=dict(z_channels=16, embedding_dim=8, attn_resolutions=()), keep=None,
                       overrides=["transformer.mlp_activation=quick_gelu", "transformer.time_embedding=sinusoidal",
                                  "transformer.null_text_embedding=false", "transformer.text_drop_prob=0",
                                  "discrete.schedule=paper"]),
    # ITHQ's codec type (a PatchVQGAN: VQModel's own nearest-neighbour encoder), the released activation
    "patch": dict(codec=dict(z_channels=16, embedding_dim=8, attn_resolutions=(8,)), keep=None, patch=True,
                  overrides=["transformer.mlp_activation=quick_gelu", "transformer.time_embedding=table",
                             "transformer.null_text_embedding=true"]),
}


def tiny_pipeline(tmp_path, variant: str, extra=()) -> TextToImagePipeline:
    """32 px images, 8x8 tokens, a 2-layer width-64 transformer, clip-text-small; every weight random."""
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    kind = PatchVQGAN if spec.get("patch") else GumbelVQVAE
    codec = kind(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, num_embeddings=24, norm_groups=8,
                 **spec["codec"]).eval()
    if spec["keep"]:
        codec = codec.keep_codes(torch.randperm(24)[:spec["keep"]].sort().values)
    tokenizer_dir = save_tokenizer(codec, tmp_path / f"{variant}_tokenizer")
    cfg = load_config(None, ["model=vq", "network=transformer", "data.size=32", f"tokenizer.path={tokenizer_dir}",
                             "text.arch=clip-text-small", "transformer.num_layers=2", "transformer.width=64",
                             "transformer.num_heads=4", "transformer.mask_text_padding=false",
                             "discrete.num_timesteps=10", *spec["overrides"], *extra])
    tokenizer = build.load_configured_tokenizer(cfg)
    model, diffusion = build.build_model_and_diffusion(cfg, tokenizer)
    with torch.no_grad():
        for tensor in model.network.state_dict().values():  # tables and norms too, not just the linears
            tensor.copy_(torch.randn_like(tensor) * 0.3)
    return TextToImagePipeline(cfg, model, diffusion, tokenizer)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    """(the vqdiff pipeline, the diffusers pipeline loaded from its exported folder, the folder)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    source = tiny_pipeline(tmp_path, request.param).save_pretrained(tmp_path / "vqdiff")
    folder = tmp_path / "diffusers"
    assert cli.main(["convert", "to-diffusers", str(source), "--out", str(folder)]) == 0
    theirs = diffusers.VQDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    return TextToImagePipeline.from_pretrained(source), theirs, folder


def transformer_log_probs(ours: TextToImagePipeline, theirs, steps):
    """Both networks' log p(x0 | x_t) on the same tokens and text; diffusers takes one timestep per call."""
    generator = torch.Generator().manual_seed(1)
    network = ours.model.network
    x = torch.randint(0, network.num_classes + 1, (len(steps), network.num_tokens), generator=generator)
    text = ours.model.encode_text(PROMPTS[:1] * len(steps))[0]
    t = torch.tensor(steps)
    with torch.no_grad():
        mine = torch.log_softmax(network(x, t, text=text).double(), dim=1)
        other = torch.cat([theirs.transformer(x[i:i + 1], encoder_hidden_states=text[i:i + 1], timestep=t[i]).sample
                           for i in range(len(steps))])
    return mine, other.double()


def test_transformer_gives_our_log_probabilities(exported):
    ours, theirs, _ = exported
    mine, other = transformer_log_probs(ours, theirs, [0, 3, 6, 9])
    assert other.shape == mine.shape == (4, ours.model.network.num_classes, 64)
    assert (mine - other).abs().max() <= 1e-4


def test_vqmodel_decodes_our_tokens(exported):
    ours, theirs, _ = exported
    tokens = torch.randint(0, ours.tokenizer.num_embeddings, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    vq = theirs.vqvae
    with torch.no_grad():
        latents = vq.quantize.get_codebook_entry(tokens.flatten(1), shape=(2, 8, 8, vq.config.vq_embed_dim))
        other = vq.decode(latents, force_not_quantize=True).sample.clamp(-1, 1)
        mine = ours.tokenizer.decode(tokens)
    assert other.shape == mine.shape == (2, 3, 32, 32)
    assert (mine - other).abs().max() <= 1e-4


def test_text_encoder_and_tokenizer_give_our_features(exported):
    ours, theirs, _ = exported
    encoder = ours.model.text_encoder
    ids, _ = encoder.tokenize(PROMPTS)
    their_ids = theirs.tokenizer(PROMPTS, padding="max_length", max_length=theirs.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
    assert torch.equal(their_ids[their_ids != theirs.tokenizer.pad_token_id], ids[ids != 0])
    with torch.no_grad():
        hidden = theirs.text_encoder(their_ids).last_hidden_state  # its own pad id: same embedding as our 0
        assert (hidden - encoder.token_features(ids)).abs().max() <= 1e-4
        prompt_embeds = theirs._encode_prompt(PROMPTS, 1, do_classifier_free_guidance=False)  # L2-normalised
    assert (prompt_embeds - encoder(PROMPTS)[0]).abs().max() <= 1e-5


def test_an_hf_text_backend_exports_too(exported, tmp_path):
    """vqdiff's `hf` backend (a local CLIPTextModel directory) goes to diffusers with its own tokenizer."""
    from transformers import CLIPTextModel
    ours, _, folder = exported
    shutil.copytree(folder / "text_encoder", tmp_path / "clip")
    for path in (folder / "tokenizer").iterdir():
        shutil.copy(path, tmp_path / "clip")
    encoder = CLIPTextEncoder(backend="hf", weights=tmp_path / "clip")
    model, tokenizer = text_to_diffusers(encoder)
    assert isinstance(model, CLIPTextModel) and tokenizer.pad_token_id != 0
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        features = ours.model.text_encoder.token_features(ours.model.text_encoder.tokenize(PROMPTS)[0])
        assert (model(ids).last_hidden_state - features).abs().max() <= 1e-4


def test_scheduler_and_null_text_follow_the_config(exported):
    ours, theirs, _ = exported
    config, network = theirs.scheduler.config, ours.model.network
    assert (config.num_vec_classes, config.num_train_timesteps) == (network.num_classes + 1, 10)
    start_end = {"released": 0.99999, "paper": 0.9}[ours.cfg.discrete.schedule]
    assert config.gamma_cum_end == start_end
    cf = theirs.learned_classifier_free_sampling_embeddings
    assert cf.learnable == (network.empty_text_embed is not None)
    if cf.learnable:
        assert torch.equal(cf.embeddings.data, network.empty_text_embed.data)


def test_diffusers_pipeline_runs_two_steps(exported):
    _, theirs, _ = exported
    images = theirs(PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0)).images
    assert [image.size for image in images] == [(32, 32)] * 2


def test_round_trip_gives_the_same_model(exported, tmp_path):
    ours, _, folder = exported
    assert cli.main(["convert", "from-diffusers", str(folder), "--out", str(tmp_path / "back")]) == 0
    back = TextToImagePipeline.from_pretrained(tmp_path / "back")
    assert type(back.tokenizer) is type(ours.tokenizer)
    assert (folder / "vqvae" / "vqdiff_gumbel.safetensors").is_file() == isinstance(ours.tokenizer, GumbelVQVAE)
    assert back.cfg.transformer.time_embedding == "table" and not back.cfg.transformer.mask_text_padding
    assert back.cfg.discrete.schedule == ours.cfg.discrete.schedule
    generator = torch.Generator().manual_seed(3)
    network = ours.model.network
    x = torch.randint(0, network.num_classes + 1, (3, 64), generator=generator)
    t = torch.tensor([0, 5, 9])
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    tokens = torch.randint(0, ours.tokenizer.num_embeddings, (2, 8, 8), generator=generator)
    with torch.no_grad():
        text, mask = ours.model.encode_text(PROMPTS)
        text_back, mask_back = back.model.encode_text(PROMPTS)
        assert torch.equal(mask, mask_back) and (text - text_back).abs().max() <= 1e-5
        ids, _ = ours.model.text_encoder.tokenize(PROMPTS)
        assert torch.equal(back.model.text_encoder.tokenize(PROMPTS)[0], ids)
        hidden = ours.model.text_encoder.token_features(ids)
        assert (back.model.text_encoder.token_features(ids) - hidden).abs().max() <= 1e-4
        logits = network(x, t, text=text[:1].expand(3, -1, -1))
        logits_back = back.model.network(x, t, text=text[:1].expand(3, -1, -1))
        assert (logits - logits_back).abs().max() <= 1e-4
        if network.empty_text_embed is not None:
            assert torch.equal(back.model.network.empty_text_embed, network.empty_text_embed)
        assert torch.equal(back.tokenizer.encode(images), ours.tokenizer.encode(images))  # our encoder again
        assert (back.tokenizer.decode(tokens) - ours.tokenizer.decode(tokens)).abs().max() <= 1e-5
    options = dict(steps=3, guidance_scale=2.0, progress=False)
    sampled = list(ours.sample_iter(PROMPTS[:2], torch.Generator().manual_seed(4), **options))[-1]
    assert torch.equal(list(back.sample_iter(PROMPTS[:2], torch.Generator().manual_seed(4), **options))[-1], sampled)


def test_a_feature_scale_is_folded_into_the_cross_attention(tmp_path):
    """text.feature_scale multiplies the unit-norm features; diffusers feeds them unscaled, so the export scales the
    cross-attention's key and value weights and divides the null caption: the same log-probabilities, with the
    caption and with the null caption, and the same samples after the way back."""
    ours = tiny_pipeline(tmp_path, "table", ["text.feature_scale=4"])
    source = ours.save_pretrained(tmp_path / "scaled")
    assert cli.main(["convert", "to-diffusers", str(source), "--out", str(tmp_path / "d")]) == 0
    theirs = diffusers.VQDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    network = ours.model.network
    x = torch.randint(0, network.num_classes + 1, (2, 64), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1, 8])
    with torch.no_grad():
        text = ours.model.encode_text(PROMPTS[:1])[0]
        embeds = theirs._encode_prompt(PROMPTS[:1], 1, do_classifier_free_guidance=False)
        assert (embeds * 4 - text).abs().max() <= 1e-4
        null = theirs.learned_classifier_free_sampling_embeddings.embeddings[None]
        for mine_text, their_text in ((text, embeds), (network.empty_text_embed[None], null)):
            for i in range(2):
                mine = torch.log_softmax(network(x[i:i + 1], t[i:i + 1], text=mine_text).double(), dim=1)
                other = theirs.transformer(x[i:i + 1], encoder_hidden_states=their_text, timestep=t[i]).sample
                assert (mine - other.double()).abs().max() <= 1e-4
    assert cli.main(["convert", "from-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back")]) == 0
    back = TextToImagePipeline.from_pretrained(tmp_path / "back")
    options = dict(steps=3, guidance_scale=2.0, progress=False)
    sampled = list(ours.sample_iter(PROMPTS[:2], torch.Generator().manual_seed(4), **options))[-1]
    assert torch.equal(list(back.sample_iter(PROMPTS[:2], torch.Generator().manual_seed(4), **options))[-1], sampled)


def test_a_padding_mask_is_refused_unless_ignored(tmp_path, caplog):
    pipe = tiny_pipeline(tmp_path, "table", ["transformer.mask_text_padding=true"])
    with pytest.raises(DiffusersConversionError, match="masks the text padding.*--ignore-padding-mask"):
        export_pipeline(pipe.cfg, pipe.tokenizer, pipe.model.network, pipe.model.text_encoder, tmp_path / "d")
    source = pipe.save_pretrained(tmp_path / "masked")
    assert cli.main(["convert", "to-diffusers", str(source), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
    with caplog.at_level(logging.WARNING):
        assert cli.main(["convert", "to-diffusers", str(source), "--out", str(tmp_path / "d"),
                         "--ignore-padding-mask"]) == 0
    assert "diffusers attends to the padding too" in caplog.text
    theirs = diffusers.VQDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    network = pipe.model.network
    network.mask_text_padding = False  # what diffusers computes: every text position attended
    mine, other = transformer_log_probs(pipe, theirs, [2, 7])
    assert (mine - other).abs().max() <= 1e-4


def test_what_diffusers_cannot_hold_is_named(tmp_path):
    pipe = tiny_pipeline(tmp_path, "table", ["transformer.mlp_ratio=2"])
    with pytest.raises(DiffusersConversionError, match="fixed 4x feed-forward"):
        transformer_to_diffusers(pipe.model.network)
    pipe.model.text_encoder.normalize = False
    with pytest.raises(DiffusersConversionError, match="always does"):
        text_to_diffusers(pipe.model.text_encoder)
    wide = GumbelVQVAE(resolution=32, ch=8, ch_mult=(2, 2), num_res_blocks=1, z_channels=8, embedding_dim=8,
                       num_embeddings=8, norm_groups=8)
    with pytest.raises(DiffusersConversionError, match="ch_mult"):
        codec_to_diffusers(wide)


def test_a_plain_vqmodel_imports_as_a_patch_vqgan(tmp_path):
    """Without our Gumbel file a VQModel (e.g. ITHQ's, euclidean codebook) imports exactly, as a PatchVQGAN."""
    torch.manual_seed(4)
    vq = diffusers.VQModel(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16,
                           down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                           up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
                           num_vq_embeddings=32, vq_embed_dim=8, norm_num_groups=8, sample_size=32).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    tokenizer = codec_from_diffusers(vq, None, None, resolution=32)
    assert isinstance(tokenizer, PatchVQGAN) and tokenizer.config["attn_resolutions"] == [8]
    again, extras = codec_to_diffusers(tokenizer)
    assert extras is None
    assert all(torch.equal(again.state_dict()[key], value) for key, value in vq.state_dict().items())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        _, _, (_, _, nearest) = vq.quantize(vq.encode(images).latents)
        tokens = tokenizer.encode(images)
        assert torch.equal(tokens.flatten(), nearest.flatten())
        latents = vq.quantize.get_codebook_entry(tokens.flatten(1), shape=(2, 8, 8, 8))
        other = vq.decode(latents, force_not_quantize=True).sample.clamp(-1, 1)
    assert (tokenizer.decode(tokens) - other).abs().max() <= 1e-4
    lopsided = diffusers.VQModel(block_out_channels=(16, 32), layers_per_block=1, latent_channels=8,
                                 down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), num_vq_embeddings=8,
                                 norm_num_groups=8)
    with pytest.raises(DiffusersConversionError, match="no vqdiff tokenizer equivalent.*do not mirror"):
        codec_from_diffusers(lopsided, None, None, resolution=16)


def test_missing_diffusers_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(DiffusersConversionError, match="optional `diffusers` package"):
        require_diffusers()
