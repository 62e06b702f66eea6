"""CLIPTextEncoder: tokens and mask, features, freezing and caching, and loading local open_clip, OpenAI
TorchScript and transformers weights that the tests save themselves (nothing is downloaded)."""

import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vqdiff.models.text import CLIPTextEncoder, is_torchscript

SOT, EOT = 49406, 49407
PROMPTS = ["a red square left of a blue circle", "", "Two   GREEN triangles!"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return CLIPTextEncoder(arch="clip-text-small")


def reference_features(tower, ids):
    """CLIP's text transformer by hand: embeddings, causal blocks, final layer norm, per-token L2 norm."""
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        return F.normalize(tower.ln_final(x), dim=-1)


def test_tokens_and_mask(encoder):
    ids, mask = encoder.tokenize(PROMPTS)
    bpe = open_clip.tokenizer.SimpleTokenizer()
    expected = open_clip.tokenize(PROMPTS)  # open_clip's own padded, truncated batch
    assert torch.equal(ids, expected)
    lengths = [len(bpe.encode(p)) + 2 for p in PROMPTS]
    assert lengths[1] == 2  # the empty prompt is start- and end-of-text
    for row, n in zip(range(3), lengths):
        assert ids[row, 0] == SOT and ids[row, n - 1] == EOT and (ids[row, n:] == 0).all()
        assert mask[row, :n].all() and not mask[row, n:].any()


def test_features_shape_norm_and_reference(encoder):
    features, mask = encoder(PROMPTS)
    assert features.shape == (3, 77, 256) and mask.shape == (3, 77) and mask.dtype == torch.bool
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3, 77))
    ids, _ = encoder.tokenize(PROMPTS)
    torch.testing.assert_close(features, reference_features(encoder.tower, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[0, 1], features[2, 1])  # different prompts, different features


def test_unnormalized_features_are_the_raw_final_layer_norm_output():
    torch.manual_seed(0)
    raw = CLIPTextEncoder(arch="clip-text-small", normalize=False)
    features, _ = raw(PROMPTS[:1])
    assert not torch.allclose(features.norm(dim=-1), torch.ones(1, 77))
    ids, _ = raw.tokenize(PROMPTS[:1])
    with torch.no_grad():
        tower = raw.tower
        expected = tower.ln_final(tower.transformer(tower.token_embedding(ids) + tower.positional_embedding,
                                                    attn_mask=tower.attn_mask))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_feature_scale_multiplies_the_unit_norm_features():
    torch.manual_seed(0)
    unit = CLIPTextEncoder(arch="clip-text-small")
    scaled = CLIPTextEncoder(arch="clip-text-small", weights=unit.tower.state_dict(), feature_scale=16.0)
    (a, mask), (b, _) = unit(PROMPTS[:2]), scaled(PROMPTS[:2])
    torch.testing.assert_close(b, 16.0 * a)
    torch.testing.assert_close(b.norm(dim=-1), torch.full(mask.shape, 16.0))
    with pytest.raises(ValueError, match="feature_scale must be positive"):
        CLIPTextEncoder(arch="clip-text-small", feature_scale=0.0)


def test_long_prompt_is_truncated_with_a_warning_naming_it(encoder, caplog):
    prompt = "a very long caption " * 30
    with caplog.at_level(logging.WARNING, logger="vqdiff.models.text"):
        ids, mask = encoder.tokenize([prompt, "short"])
    assert any(prompt in record.getMessage() for record in caplog.records)
    assert "short" not in caplog.text
    assert ids[0, -1] == EOT and mask[0].all()
    assert torch.equal(ids[0], open_clip.tokenize([prompt])[0])


def test_frozen_encoder_has_no_gradients_and_stays_in_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.tower.training
    features, _ = encoder(PROMPTS)
    assert not features.requires_grad


def test_trainable_encoder_gets_gradients():
    torch.manual_seed(0)
    trainable = CLIPTextEncoder(arch="clip-text-small", trainable=True)
    assert trainable.training
    features, _ = trainable(PROMPTS)
    features.sum().backward()
    assert trainable.tower.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0


def test_encode_cached_equals_forward_and_skips_known_prompts(encoder, monkeypatch):
    encoder.cache.clear()
    calls = []
    original = encoder.token_features
    monkeypatch.setattr(encoder, "token_features", lambda ids: calls.append(len(ids)) or original(ids))
    features, mask = encoder.encode_cached(PROMPTS)
    again, again_mask = encoder.encode_cached([PROMPTS[2], PROMPTS[0], "new prompt"])
    assert calls == [3, 1]  # only the unseen prompt is encoded the second time
    direct, direct_mask = encoder([PROMPTS[2], PROMPTS[0], "new prompt"])
    torch.testing.assert_close(again, direct)
    assert torch.equal(again_mask, direct_mask)
    torch.testing.assert_close(again[:2], features[[2, 0]])


def test_cache_drops_least_recently_used(encoder):
    encoder.cache.clear()
    encoder.cache_size = 2
    try:
        encoder.encode_cached(["a", "b"])
        encoder.encode_cached(["a"])  # "b" is now the oldest
        encoder.encode_cached(["c"])
        assert list(encoder.cache) == ["a", "c"]
    finally:
        encoder.cache_size = 4096
        encoder.cache.clear()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_custom_tower_weights_round_trip(tmp_path, encoder, suffix):
    path = tmp_path / f"tower{suffix}"
    state = {k: v.contiguous() for k, v in encoder.tower.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = CLIPTextEncoder(arch="clip-text-small", weights=path)
    torch.testing.assert_close(loaded(PROMPTS)[0], encoder(PROMPTS)[0], rtol=0, atol=0)


def test_missing_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.pt"):
        CLIPTextEncoder(arch="clip-text-small", weights=tmp_path / "nothing_here.pt")


def tiny_clip(quick_gelu=True):
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=32, quick_gelu=quick_gelu,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=32, image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))


def test_open_clip_checkpoint_through_create_model(tmp_path, monkeypatch):
    """A full open_clip CLIP state dict (image tower included) loads strictly; only the text side is kept."""
    clip = tiny_clip(quick_gelu=False)
    path = tmp_path / "clip.bin"
    torch.save(clip.state_dict(), path)
    config = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 64, "patch_size": 32,
                                              "image_size": 64},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test-clip", config)
    loaded = CLIPTextEncoder(arch="tiny-test-clip", weights=path)
    assert not hasattr(loaded.tower, "visual")
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for n, p in clip.named_parameters() if not n.startswith("visual") and n != "logit_scale")
    ids, _ = loaded.tokenize(PROMPTS)
    torch.testing.assert_close(loaded(PROMPTS)[0], reference_features(clip, ids), rtol=1e-5, atol=1e-6)


class OpenAIArchive(nn.Module):
    """Holds a CLIP's tensors under OpenAI's names (no attn_mask buffer), to be saved as TorchScript."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, param in clip.named_parameters(recurse=False):
            setattr(self, name, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_torchscript_archive(tmp_path):
    clip = tiny_clip()
    with torch.no_grad():  # OpenAI's files hold fp16 weights; open_clip rounds through fp16 the same way
        for name, p in clip.named_parameters():
            if p.ndim == 2 and "embedding" not in name:
                p.copy_(p.half().float())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(OpenAIArchive(clip)).save(str(path))
    plain = tmp_path / "state.pt"
    torch.save(clip.state_dict(), plain)
    assert is_torchscript(path) and not is_torchscript(plain)
    loaded = CLIPTextEncoder(weights=path)  # arch is read from the archive
    assert loaded.dim == 64
    ids, _ = loaded.tokenize(PROMPTS)
    torch.testing.assert_close(loaded(PROMPTS)[0], reference_features(clip, ids), rtol=1e-5, atol=1e-5)


def hf_tokenizer():
    """A transformers CLIPTokenizer built from open_clip's bundled BPE file (CLIP's vocabulary)."""
    from transformers import CLIPTokenizer

    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def open_clip_to_hf(tower, prefix):
    """open_clip text tower tensors under transformers CLIPTextModel names."""
    state = {f"{prefix}embeddings.token_embedding.weight": tower.token_embedding.weight,
             f"{prefix}embeddings.position_embedding.weight": tower.positional_embedding,
             f"{prefix}final_layer_norm.weight": tower.ln_final.weight,
             f"{prefix}final_layer_norm.bias": tower.ln_final.bias}
    for i, block in enumerate(tower.transformer.resblocks):
        layer = f"{prefix}encoder.layers.{i}."
        for kind, weight in (("weight", block.attn.in_proj_weight), ("bias", block.attn.in_proj_bias)):
            for proj, chunk in zip("qkv", weight.chunk(3)):
                state[f"{layer}self_attn.{proj}_proj.{kind}"] = chunk
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = block.get_submodule(ours)
            state[f"{layer}{theirs}.weight"], state[f"{layer}{theirs}.bias"] = module.weight, module.bias
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, encoder):
    """The `encoder` fixture's weights saved as a transformers CLIPTextModel directory."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=SOT, eos_token_id=EOT)
    model = CLIPTextModel(config)
    prefix = next(k for k in model.state_dict() if k.endswith("embeddings.token_embedding.weight"))
    prefix = prefix[:-len("embeddings.token_embedding.weight")]
    missing, unexpected = model.load_state_dict(open_clip_to_hf(encoder.tower, prefix), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    directory = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(directory)
    hf_tokenizer().save_pretrained(directory)
    return directory, model


def test_hf_directory_round_trip(hf_dir):
    directory, model = hf_dir
    loaded = CLIPTextEncoder(backend="hf", weights=directory)
    assert loaded.dim == 256 and not any(p.requires_grad for p in loaded.parameters())
    features, mask = loaded(PROMPTS)
    ids, _ = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        expected = F.normalize(model.eval()(input_ids=ids).last_hidden_state, dim=-1)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert features.shape == (3, 77, 256) and mask.sum(1).tolist()[1] == 2


def test_hf_and_open_clip_backends_agree_on_the_same_weights(hf_dir, encoder):
    loaded = CLIPTextEncoder(backend="hf", weights=hf_dir[0])
    hf_ids, hf_mask = loaded.tokenize(PROMPTS)
    ids, mask = encoder.tokenize(PROMPTS)
    assert torch.equal(hf_ids, ids) and torch.equal(hf_mask, mask)  # same BPE, same 0-padding
    torch.testing.assert_close(loaded(PROMPTS)[0], encoder(PROMPTS)[0], rtol=1e-4, atol=1e-5)


def test_hf_needs_a_directory():
    with pytest.raises(ValueError, match="hf"):
        CLIPTextEncoder(backend="hf", weights="none")


def test_vit_b_32_text_tower_has_the_released_size_on_the_meta_device():
    with torch.device("meta"):
        vit = CLIPTextEncoder(arch="ViT-B-32")
    assert vit.dim == 512
    assert sum(p.numel() for p in vit.parameters()) == 63_428_096  # NOTES: CLIP text incl. text_projection


@pytest.mark.slow
def test_vit_b_32_random_init_encodes():
    vit = CLIPTextEncoder(arch="ViT-B-32")
    features, mask = vit(["a photo of a cat"])
    assert features.shape == (1, 77, 512) and mask.sum() == 7
