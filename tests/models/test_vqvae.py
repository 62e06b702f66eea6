import math

import pytest
import torch

from vqdiff.models.gumbel import GumbelQuantizer, TemperatureDecay, TemperatureSchedule, gumbel_softmax, temperature_at
from vqdiff.models.taming_blocks import AttnBlock
from vqdiff.models.vqvae import GumbelVQVAE

TINY = dict(resolution=16, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=16,
            norm_groups=8, embedding_dim=16, num_embeddings=512)


def tiny_model(seed: int = 0, **overrides) -> GumbelVQVAE:
    torch.manual_seed(seed)
    return GumbelVQVAE.from_config({**TINY, **overrides}).eval()


def images(batch: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_of_every_path():
    model = tiny_model().train()
    x = images(2)
    out = model(x, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert out["recon"].shape == (2, 3, 16, 16)
    assert out["logits"].shape == (2, 512, 8, 8)
    assert out["tokens"].shape == (2, 8, 8) and out["tokens"].dtype == torch.int64
    assert out["kl"].shape == () and out["kl_loss"].shape == ()
    model.eval()
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.int64
    assert model.encode(x, sample=True, generator=torch.Generator().manual_seed(0)).shape == (2, 8, 8)
    recon = model.decode(tokens)
    assert recon.shape == (2, 3, 16, 16) and recon.min() >= -1 and recon.max() <= 1
    assert model.num_embeddings == 512 and model.codebook_size == 512 and model.downsample_factor == 2
    # non-square inputs of any multiple of the factor work too
    assert model.encode(images(1, size=16)[..., :12]).shape == (1, 8, 6)


def test_shapes_config_gives_16x16_tokens_from_64px():
    torch.manual_seed(0)
    model = GumbelVQVAE(resolution=64, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                        z_channels=64, embedding_dim=64, num_embeddings=1024).eval()
    assert model.downsample_factor == 4
    with torch.no_grad():
        tokens = model.encode(images(1, size=64))
        assert tokens.shape == (1, 16, 16)
        assert model.decode(tokens).shape == (1, 3, 64, 64)


def test_eval_forward_is_the_deterministic_encode_decode():
    model = tiny_model()
    x = images(2)
    with torch.no_grad():
        out = model(x)
        tokens = model.encode(x)
        assert torch.equal(out["tokens"], tokens)
        torch.testing.assert_close(out["recon"].clamp(-1, 1), model.decode(tokens))


def test_attention_matches_the_taming_formula_in_float64():
    torch.manual_seed(0)
    block = AttnBlock(32, groups=8).double()
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # [B, C, N]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=2)  # [B, N(query), N(key)]
    reference = x + block.proj_out(torch.einsum("bcj,bij->bci", v, weights).reshape(x.shape))
    torch.testing.assert_close(block(x), reference)


def test_gumbel_max_samples_follow_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    probs = logits.softmax(0)
    draws = 40_000
    grid = logits.view(1, 4, 1, 1).expand(draws, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    hard = gumbel_softmax(grid, 1.0, hard=True, generator=g)
    freq = hard.mean((0, 2, 3))
    # 5 standard errors of a frequency near 0.5 over 40k draws is 0.0125
    torch.testing.assert_close(freq, probs, atol=0.0125, rtol=0)
    assert torch.equal(hard.sum(1), torch.ones(draws, 1, 1))


def test_quantizer_sample_ids_draw_from_the_softmax_and_argmax_without_sample():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(num_hiddens=4, embedding_dim=3, num_embeddings=5)
    z = torch.randn(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    probs = quantizer.logits(z[:1]).flatten().softmax(0).detach()
    with torch.no_grad():
        ids = quantizer.sample_ids(z, sample=True, generator=torch.Generator().manual_seed(1))
        freq = torch.bincount(ids.flatten(), minlength=5).double() / ids.numel()
        assert torch.all(quantizer.sample_ids(z) == probs.argmax())
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)


def test_gumbel_softmax_takes_a_generator():
    logits = torch.randn(2, 7, 3, 3)
    a = gumbel_softmax(logits, 0.7, hard=False, generator=torch.Generator().manual_seed(5))
    b = gumbel_softmax(logits, 0.7, hard=False, generator=torch.Generator().manual_seed(5))
    c = gumbel_softmax(logits, 0.7, hard=False, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 3, 3))


def test_straight_through_forward_is_one_hot_and_backward_is_the_soft_gradient():
    logits = torch.randn(3, 6, 2, 2, requires_grad=True)
    upstream = torch.randn(3, 6, 2, 2)
    hard = gumbel_softmax(logits, 0.5, hard=True, generator=torch.Generator().manual_seed(0))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    (hard * upstream).sum().backward()
    hard_grad = logits.grad.clone()
    logits.grad = None
    soft = gumbel_softmax(logits, 0.5, hard=False, generator=torch.Generator().manual_seed(0))
    (soft * upstream).sum().backward()
    torch.testing.assert_close(hard_grad, logits.grad)
    assert hard_grad.abs().sum() > 0


def test_straight_through_gradients_reach_encoder_and_codebook():
    model = tiny_model().train()
    out = model(images(2), temperature=1.0, generator=torch.Generator().manual_seed(0))
    (out["recon"].square().mean() + out["kl_loss"]).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.proj.weight", "quantize.embed.weight",
                 "decoder.conv_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_kl_matches_brute_force_kl_to_uniform():
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(num_hiddens=4, embedding_dim=3, num_embeddings=6, kl_weight=0.25).eval()
    z = torch.randn(2, 4, 3, 3)
    out = quantizer(z)
    logits = quantizer.logits(z).detach().double()
    expected, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                q = logits[b, :, i, j].softmax(0)
                expected += sum(float(p) * math.log(float(p) * 6) for p in q)
                count += 1
    assert out["kl"].item() == pytest.approx(expected / count, rel=1e-5)
    assert out["kl_loss"].item() == pytest.approx(0.25 * expected / count, rel=1e-5)


def test_temperature_annealing_schedules():
    exponential = TemperatureSchedule(start=1.0, end=1 / 16, steps=100)
    assert temperature_at(0, exponential) == pytest.approx(1.0)
    assert temperature_at(50, exponential) == pytest.approx(0.25)  # geometric midpoint of 1 and 1/16
    assert temperature_at(100, exponential) == pytest.approx(1 / 16)
    assert temperature_at(10_000, exponential) == pytest.approx(1 / 16)
    values = [temperature_at(s, exponential) for s in range(0, 101, 10)]
    assert all(a > b for a, b in zip(values, values[1:]))
    linear = TemperatureSchedule(start=0.9, end=0.1, steps=8, decay="linear")
    assert temperature_at(2, linear) == pytest.approx(0.7)
    cosine = TemperatureSchedule(start=0.9, end=0.1, steps=8, decay=TemperatureDecay.COSINE)
    assert temperature_at(4, cosine) == pytest.approx(0.5)
    assert temperature_at(2, cosine) == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi / 4)))
    assert temperature_at(77, TemperatureSchedule(start=0.7, decay="constant")) == 0.7
    with pytest.raises(ValueError, match="positive"):
        TemperatureSchedule(start=1.0, end=0.0)
    with pytest.raises(ValueError):
        TemperatureSchedule(decay="quadratic")
    with pytest.raises(ValueError, match="step"):
        temperature_at(-1, exponential)


def test_temperature_changes_the_training_sample():
    # seeded: unseeded, about one draw in six has two near-tied code logits, where even a cold sample blends
    torch.manual_seed(0)
    quantizer = GumbelQuantizer(num_hiddens=4, embedding_dim=3, num_embeddings=8, straight_through=False).train()
    z = torch.randn(1, 4, 4, 4)
    hot = quantizer(z, temperature=10.0, generator=torch.Generator().manual_seed(0))
    cold = quantizer(z, temperature=0.05, generator=torch.Generator().manual_seed(0))
    def distance_to_chosen_code(out):
        return (out["z_q"].detach() - quantizer.embed_ids(out["tokens"])).abs().mean()

    # a cold soft sample is nearly the chosen code's embedding; a hot one is a blend of all codes
    assert distance_to_chosen_code(cold) < 0.1 * distance_to_chosen_code(hot)


@pytest.fixture(scope="module")
def usage():
    model = tiny_model()
    batches = [images(2, seed=s) for s in range(3)]
    counts = model.codebook_usage(batches, progress=False)
    return model, batches, counts


def test_codebook_usage_counts_every_token(usage):
    model, batches, counts = usage
    assert counts.shape == (512,) and counts.dtype == torch.int64
    expected = sum(torch.bincount(model.encode(b).flatten(), minlength=512) for b in batches)
    assert torch.equal(counts, expected)
    as_dicts = model.codebook_usage([{"image": b, "caption": "x"} for b in batches], progress=False)
    as_tuples = model.codebook_usage([(b, 0) for b in batches], progress=False)
    assert torch.equal(as_dicts, counts) and torch.equal(as_tuples, counts)


def test_trimming_round_trip(usage):
    model, batches, counts = usage
    trimmed = model.trim(counts)
    kept = torch.nonzero(counts).flatten()
    assert 1 < trimmed.num_embeddings == kept.numel() < 512
    assert trimmed.codebook_size == 512
    assert torch.equal(trimmed.code_map, kept)
    for x in batches:
        full = model.encode(x)
        ids = trimmed.encode(x)
        assert ids.max() < trimmed.num_embeddings
        assert torch.equal(kept[ids], full)  # trimmed id i is full code kept[i]
        with torch.no_grad():
            torch.testing.assert_close(trimmed.decode(ids), model.decode(full), rtol=0, atol=0)
    # sampling only ever returns kept codes
    sampled = trimmed.encode(batches[0], sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.max() < trimmed.num_embeddings
    # the usage of a trimmed model is reported over full codes, so it can be trimmed again
    assert torch.equal(trimmed.codebook_usage(batches, progress=False), counts)


def test_trimmed_tokenizer_saves_and_loads_its_mapping(usage):
    model, batches, counts = usage
    trimmed = model.trim(counts, min_count=2)
    assert torch.equal(trimmed.code_map, torch.nonzero(counts >= 2).flatten())
    state = trimmed.state_dict()
    assert state["code_map"].dtype == torch.int64
    reloaded = GumbelVQVAE.from_config(trimmed.config)
    reloaded.load_state_dict(state)
    reloaded.eval()
    assert reloaded.num_embeddings == trimmed.num_embeddings
    assert torch.equal(reloaded.encode(batches[1]), trimmed.encode(batches[1]))


def test_keep_codes_matches_released_style_maps_and_checks_subsets():
    model = tiny_model()
    trimmed = model.keep_codes(torch.tensor([0, 3, 9, 10]))
    tokens = torch.tensor([[[0, 1], [2, 3]]])
    with torch.no_grad():
        torch.testing.assert_close(trimmed.decode(tokens), model.decode(torch.tensor([[[0, 3], [9, 10]]])))
        assert trimmed.encode(images(1)).max() <= 3
    with pytest.raises(ValueError, match="subset"):
        trimmed.keep_codes(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="distinct"):
        model.keep_codes(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="no code"):
        model.trim(torch.zeros(512, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must have shape"):
        model.trim(torch.ones(10, dtype=torch.long))


def test_bad_input_raises_clear_errors():
    model = tiny_model()
    trimmed = model.keep_codes(torch.arange(10))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        trimmed.decode(torch.full((1, 2, 2), 10))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="unknown GumbelVQVAE config keys: \\['n_embed'\\]"):
        GumbelVQVAE.from_config({**TINY, "n_embed": 3})
    with pytest.raises(ValueError, match="norm_groups"):
        GumbelVQVAE.from_config({**TINY, "ch": 20})


def test_latents_are_the_argmax_code_embeddings_and_decode_like_tokens():
    """encode_latents -> decode_latents is the tokenizer's own reconstruction, also for a trimmed tokenizer, and
    the latents follow from cached tokens (embed_tokens)."""
    x = images(2)
    for model in (tiny_model(), tiny_model().keep_codes(torch.arange(7, 300, 3))):
        tokens = model.encode(x)
        latents = model.encode_latents(x)
        assert latents.shape == (2, 16, 8, 8)
        torch.testing.assert_close(latents, model.quantize.embed.weight[model.full_codes(tokens)].permute(0, 3, 1, 2))
        torch.testing.assert_close(model.embed_tokens(tokens), latents)
        torch.testing.assert_close(model.decode_latents(latents), model.decode(tokens))
        shifted = model.decode_latents(latents + 0.5)  # continuous latents off the codebook still decode
        assert shifted.shape == (2, 3, 16, 16) and not torch.equal(shifted, model.decode(tokens))


def test_nearest_tokens_is_the_brute_force_nearest_code_and_inverts_embed_tokens():
    """Latent diffusion's VQ decoding: each latent vector goes to its nearest code embedding (float64 brute force),
    in the tokenizer's own (trimmed) ids, so the embeddings of tokens, a little perturbed, map back to the tokens."""
    generator = torch.Generator().manual_seed(3)
    for model in (tiny_model(), tiny_model().keep_codes(torch.arange(7, 300, 3))):
        tokens = torch.randint(0, model.num_embeddings, (2, 4, 4), generator=generator)
        latents = model.embed_tokens(tokens)
        assert torch.equal(model.nearest_tokens(latents + 1e-3 * torch.randn(latents.shape, generator=generator)),
                           tokens)
        z = torch.randn(3, 16, 5, 4, generator=generator)
        codebook = model.quantize.codebook(model.code_map).double()  # [K', D]
        distances = ((z.double().permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1)  # [B, h, w, K']
        assert torch.equal(model.nearest_tokens(z), distances.argmin(-1))


def test_patch_encoder_codes_depend_on_their_own_patch_only(tmp_path):
    """encoder="patch": a token's pre-quantisation features, hence its code, change when a pixel of its own f x f
    patch changes and never when any other pixel does (float64); the choice survives save/load and trimming."""
    from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
    model = tiny_model(encoder="patch").double()
    x = images(1).double()
    features = model.quant_conv(model.encoder(x))  # [1, 16, 8, 8]; f = 2
    for y, x_ in [(0, 0), (3, 5), (7, 7)]:
        changed = x.clone()
        changed[:, :, 2 * y + 1, 2 * x_] += 0.5
        moved = (model.quant_conv(model.encoder(changed)) - features).abs().amax(1)[0]  # [8, 8]
        assert moved[y, x_] > 0
        moved[y, x_] = 0
        assert moved.abs().max() == 0
    trimmed = model.float().keep_codes(torch.arange(0, 512, 2))
    loaded = load_tokenizer(save_tokenizer(trimmed, tmp_path / "tok"))
    assert loaded.config["encoder"] == "patch" and type(loaded.encoder).__name__ == "PatchEncoder"
    torch.testing.assert_close(loaded.encode(images(2)), trimmed.encode(images(2)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="encoder must be one of \\['taming', 'patch', 'layered'\\], got 'conv'"):
        tiny_model(encoder="conv")


def test_patch_decoder_draws_each_patch_from_its_own_code_only(tmp_path):
    """decoder="patch": changing one latent changes exactly its own f x f pixels of the image (float64); with the
    patch encoder the whole tokenizer is patch-local; the choice survives save/load."""
    from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
    model = tiny_model(encoder="patch", decoder="patch").double()
    z = torch.randn(1, model.config["z_channels"], 8, 8, dtype=torch.float64)
    out = model.decoder(z)  # [1, 3, 16, 16]; f = 2
    for y, x in [(0, 0), (2, 6), (7, 7)]:
        changed = z.clone()
        changed[:, :, y, x] += 1.0
        moved = (model.decoder(changed) - out).abs().amax(1)[0]  # [16, 16]
        assert moved[2 * y:2 * y + 2, 2 * x:2 * x + 2].min() > 0
        moved[2 * y:2 * y + 2, 2 * x:2 * x + 2] = 0
        assert moved.max() == 0
    loaded = load_tokenizer(save_tokenizer(model.float(), tmp_path / "tok"))
    assert loaded.config["decoder"] == "patch" and type(loaded.decoder).__name__ == "PatchDecoder"
    torch.testing.assert_close(loaded.decode(loaded.encode(images(2))), model.decode(model.encode(images(2))))
    with pytest.raises(ValueError, match="decoder must be one of"):
        tiny_model(decoder="conv")


def test_factored_codebook_is_a_product_of_two_categoricals(tmp_path):
    """tokenizer.factors=[F, S]: softmax over the F * S code logits equals the outer product of the two factors'
    softmaxes (float64), code i * S + j embeds as [row i of the first table, row j of the second], every code
    survives trimming at min_count=0 and save/load, and a bad factorisation is refused."""
    from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
    model = tiny_model(num_embeddings=24, factors=[6, 4]).double()
    z = model.quant_conv(model.encoder(images(2).double()))
    parts = model.quantize.proj(z)
    joint = model.quantize.logits(z).softmax(1)  # [B, 24, h, w]
    product = (parts[:, :6].softmax(1)[:, :, None] * parts[:, 6:].softmax(1)[:, None]).flatten(1, 2)
    torch.testing.assert_close(joint, product, rtol=0, atol=1e-12)
    codebook = model.quantize.codebook()
    half = model.config["embedding_dim"] // 2
    for i, j in [(0, 0), (5, 3), (2, 1)]:
        assert torch.equal(codebook[i * 4 + j, :half], model.quantize.embed_first.weight[i])
        assert torch.equal(codebook[i * 4 + j, half:], model.quantize.embed_second.weight[j])
    kept = model.float().trim(torch.zeros(24, dtype=torch.long), min_count=0)
    loaded = load_tokenizer(save_tokenizer(kept, tmp_path / "tok"))
    assert loaded.num_embeddings == 24 and loaded.config["factors"] == [6, 4]
    tokens = torch.arange(24).view(1, 4, 6)
    torch.testing.assert_close(loaded.decode(tokens), model.float().decode(tokens))
    with pytest.raises(ValueError, match="product is num_embeddings"):
        tiny_model(num_embeddings=24, factors=[5, 4])
