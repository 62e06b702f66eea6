"""DiffusionTransformer: reference forward, released layout and sizes, text masking, K/V caching,
the null text embedding, gradient checkpointing, and a small run that must learn."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqdiff.diffusion.guidance import concat_cond, guided_call
from vqdiff.models.transformer import TRANSFORMER_PRESETS, DiffusionTransformer, parameter_counts

K, GRID, TEXT_DIM, TEXT_LEN = 11, (3, 4), 12, 7


def tiny(**kwargs) -> DiffusionTransformer:
    torch.manual_seed(0)
    config = dict(num_classes=K, grid_size=GRID, width=16, num_layers=2, num_heads=4, text_dim=TEXT_DIM,
                  text_length=TEXT_LEN, num_steps=10)
    model = DiffusionTransformer(**{**config, **kwargs})
    for name, p in model.named_parameters():  # larger than the 0.02 init, so every path visibly matters
        torch.nn.init.normal_(p, std=0.3)
    return model


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, K + 1, (batch, GRID[0] * GRID[1]), generator=g)
    t = torch.randint(0, 10, (batch,), generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    lengths = torch.tensor([2, 5, 7, 3])[:batch]
    mask = torch.arange(TEXT_LEN)[None] < lengths[:, None]
    return x, t, text, mask


def reference_forward(model, x, t, text, mask, quick_gelu):
    """The network written out in float64 from its parameters: Gu et al. 2022 Fig. 1 / the released code."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn1.num_heads

    def linear(h, name):
        return h @ p[name + ".weight"].T + p[name + ".bias"]

    def ada_norm(h, name):
        e = p[name + ".emb.weight"][t]
        scale, shift = linear(e * torch.sigmoid(e), name + ".linear").chunk(2, dim=-1)
        return F.layer_norm(h, h.shape[-1:], eps=1e-5) * (1 + scale[:, None]) + shift[:, None]

    def attention(h, context, name, key_mask):
        q, k, v = (linear(src, f"{name}.{w}").unflatten(-1, (heads, -1)).transpose(1, 2)
                   for src, w in ((h, "query"), (context, "key"), (context, "value")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None], float("-inf"))
        return linear((scores.softmax(-1) @ v).transpose(1, 2).flatten(2), name + ".proj")

    rows = torch.arange(GRID[0]).repeat_interleave(GRID[1])
    cols = torch.arange(GRID[1]).repeat(GRID[0])
    h = p["content_emb.emb.weight"][x] + p["content_emb.height_emb.weight"][rows]
    h = h + p["content_emb.width_emb.weight"][cols]  # position r * w + c gets row r and column c
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        h = h + attention(ada_norm(h, b + ".ln1"), ada_norm(h, b + ".ln1"), b + ".attn1", None)
        h = h + attention(ada_norm(h, b + ".ln1_1"), text.double(), b + ".attn2", mask)
        m = linear(F.layer_norm(h, h.shape[-1:], p[b + ".ln2.weight"], p[b + ".ln2.bias"], 1e-5), b + ".mlp.0")
        m = m * torch.sigmoid(1.702 * m) if quick_gelu else F.gelu(m)
        h = h + linear(m, b + ".mlp.2")
    h = F.layer_norm(h, h.shape[-1:], p["to_logits.0.weight"], p["to_logits.0.bias"], 1e-5)
    return linear(h, "to_logits.1").transpose(1, 2)  # [B, K, N]


@pytest.mark.parametrize("mlp_activation", ["gelu", "quick_gelu"])
def test_forward_matches_float64_reference(mlp_activation):
    model = tiny(mlp_activation=mlp_activation)
    x, t, text, mask = inputs()
    out = model(x, t, text=text, text_mask=mask)
    assert out.shape == (3, K, GRID[0] * GRID[1]) and out.dtype == torch.float32
    expected = reference_forward(model, x, t, text, mask, quick_gelu=mlp_activation == "quick_gelu")
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_state_dict_follows_the_released_layout():
    model = tiny(num_layers=1, null_text_embedding=True)
    d, d4 = 16, 64
    expected = {
        "content_emb.emb.weight": (K + 1, d), "content_emb.height_emb.weight": (3, d),
        "content_emb.width_emb.weight": (4, d), "empty_text_embed": (TEXT_LEN, TEXT_DIM),
        "to_logits.0.weight": (d,), "to_logits.0.bias": (d,), "to_logits.1.weight": (K, d), "to_logits.1.bias": (K,),
        "blocks.0.ln2.weight": (d,), "blocks.0.ln2.bias": (d,), "blocks.0.mlp.0.weight": (d4, d),
        "blocks.0.mlp.0.bias": (d4,), "blocks.0.mlp.2.weight": (d, d4), "blocks.0.mlp.2.bias": (d,),
    }
    for norm in ("ln1", "ln1_1"):
        expected.update({f"blocks.0.{norm}.emb.weight": (10, d), f"blocks.0.{norm}.linear.weight": (2 * d, d),
                         f"blocks.0.{norm}.linear.bias": (2 * d,)})
    for attn, kv_dim in (("attn1", d), ("attn2", TEXT_DIM)):
        for w, in_dim in (("query", d), ("key", kv_dim), ("value", kv_dim), ("proj", d)):
            expected.update({f"blocks.0.{attn}.{w}.weight": (d, in_dim), f"blocks.0.{attn}.{w}.bias": (d,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def count_formula(num_classes, grid, width, layers, text_dim=512, steps=100):
    """Parameters of the released Text2ImageTransformer, part by part (NOTES: B = 388,780,871)."""
    d = width
    embedding = (num_classes + 1) * d + (grid[0] + grid[1]) * d
    ada_norm = steps * d + 2 * d * d + 2 * d
    block = 2 * ada_norm + 4 * (d * d + d) + 2 * (d * d + d) + 2 * (text_dim * d + d) + 2 * d + 8 * d * d + 5 * d
    head = 2 * d + num_classes * d + num_classes
    return embedding + layers * block + head


@pytest.mark.parametrize("preset, num_classes, total", [("B", 2887, 388_780_871), ("F", 2887, 388_780_871),
                                                        ("L", 4096, 1_359_274_624), ("S", 2887, 17_364_103)])
def test_preset_parameter_counts_on_meta_device(preset, num_classes, total):
    with torch.device("meta"):
        model = DiffusionTransformer(num_classes=num_classes, null_text_embedding=True, **TRANSFORMER_PRESETS[preset])
    counts = parameter_counts(model)
    assert counts["empty_text_embed"] == 77 * 512
    assert counts["total"] - counts["empty_text_embed"] == total
    size = TRANSFORMER_PRESETS[preset]
    assert total == count_formula(num_classes, (32, 32), size["width"], size["num_layers"])
    assert set(counts) == {"content_emb", "blocks", "to_logits", "empty_text_embed", "total"}


def test_b_preset_matches_the_published_parts():
    with torch.device("meta"):
        model = DiffusionTransformer(num_classes=2887, **TRANSFORMER_PRESETS["B"])
    counts = parameter_counts(model)
    assert (counts["content_emb"], counts["to_logits"]) == (3_022_848, 2_961_223)
    assert counts["blocks"] == 19 * 20_147_200 and "empty_text_embed" not in counts


def test_padded_text_positions_leak_nothing_when_masked():
    model = tiny(mask_text_padding=True)
    x, t, text, mask = inputs()
    out = model(x, t, text=text, text_mask=mask)
    noisy = text + 5.0 * torch.randn_like(text) * ~mask[..., None]  # change only the padding
    torch.testing.assert_close(model(x, t, text=noisy, text_mask=mask), out, rtol=0, atol=1e-5)
    real = text.clone()
    real[:, 0] += 1.0  # start-of-text is a real token: it must matter
    assert (model(x, t, text=real, text_mask=mask) - out).abs().amax() > 1e-2


def test_released_setting_attends_to_padding():
    model = tiny(mask_text_padding=False)
    x, t, text, mask = inputs()
    noisy = text + 5.0 * torch.randn_like(text) * ~mask[..., None]
    diff = model(x, t, text=noisy, text_mask=mask) - model(x, t, text=text, text_mask=mask)
    assert diff[:2].abs().amax() > 1e-2  # rows 0 and 1 have padding
    assert diff[2].abs().amax() == 0  # row 2 fills all 7 positions


@pytest.mark.parametrize("mask_text_padding", [True, False])
def test_cached_text_equals_uncached(mask_text_padding):
    model = tiny(mask_text_padding=mask_text_padding).eval()
    x, t, text, mask = inputs()
    cached = model.cache_text(text, mask)
    assert cached["text_kv"].shape == (3, 2, 2, 4, TEXT_LEN, 4)
    torch.testing.assert_close(model(x, t, **cached), model(x, t, text=text, text_mask=mask), rtol=0, atol=1e-5)


def test_cached_condition_and_null_condition_concatenate_for_guidance():
    model = tiny(null_text_embedding=True).eval()
    x, t, text, mask = inputs()
    cond, null_cond = model.cache_text(text, mask), model.cache_text(*model.null_text(3))
    both = model(torch.cat([x, x]), torch.cat([t, t]), **concat_cond(cond, null_cond))
    torch.testing.assert_close(both[:3], model(x, t, text=text, text_mask=mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(both[3:], model(x, t, text=model.null_text(3)[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cached", [True, False])
def test_guided_call_shares_the_first_self_attention_and_the_head(cached, monkeypatch):
    """x and t once with 2B text rows (what guided_call passes) give the 2B call's logits, the first block's
    self-attention running on B rows and every later one on 2B; with guidance_scale the head runs once on B
    mixed rows and gives null + s (cond - null) of those logits."""
    model = tiny(null_text_embedding=True).eval()
    x, t, text, mask = inputs()
    null, null_mask = model.null_text(3)
    cond, null_cond = ((model.cache_text(text, mask), model.cache_text(null, null_mask)) if cached
                       else (dict(text=text, text_mask=mask), dict(text=null.contiguous(), text_mask=null_mask)))
    both = model(torch.cat([x, x]), torch.cat([t, t]), **concat_cond(cond, null_cond))
    torch.testing.assert_close(model(x, t, **concat_cond(cond, null_cond)), both, rtol=0, atol=1e-5)
    attention_batches, head_batches = [], []
    hooks = [block.attn1.register_forward_hook(lambda m, args, out: attention_batches.append(out.shape[0]))
             for block in model.blocks]
    linear = torch.nn.functional.linear

    def counting_linear(input, weight, bias=None):
        head = model.to_logits[1].weight
        if weight.shape[1:] == head.shape[1:] and torch.equal(weight[:head.shape[0]], head):  # rows padded
            head_batches.append(input.shape[0])
        return linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    guided, none = guided_call(model, x, t, cond, null_cond, 3.0)
    for hook in hooks:
        hook.remove()
    assert attention_batches == [3, 6] and head_batches == [3] and none is None
    torch.testing.assert_close(guided, torch.lerp(both[3:], both[:3], 3.0), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale needs the text of 2B rows"):
        model(x, t, guidance_scale=3.0, **cond)


@pytest.mark.parametrize("factors", [None, (4, 5)])
def test_logits_are_class_major_in_training_and_token_major_otherwise(factors):
    """The same values either way; training writes [B, K, N] memory, inference [B, N, K] memory (a view)."""
    model = tiny(**({} if factors is None else dict(num_classes=20, factors=factors)))
    x, t, text, mask = inputs()
    x = x.clamp(max=model.num_classes)
    training = model.train()(x, t, text=text, text_mask=mask)
    inference = model.eval()(x, t, text=text, text_mask=mask)
    assert training.is_contiguous() and inference.stride(1) == 1  # each token's classes contiguous
    torch.testing.assert_close(inference, training, rtol=0, atol=1e-5)


def test_null_text_embedding():
    model = tiny(null_text_embedding=True)
    text, mask = model.null_text(2)
    assert text.shape == (2, TEXT_LEN, TEXT_DIM) and mask.all() and mask.shape == (2, TEXT_LEN)
    x, t, _, _ = inputs(batch=2)
    model(x, t, text=text, text_mask=mask).sum().backward()
    assert model.empty_text_embed.grad.abs().sum() > 0  # learnable through the unconditional path
    with pytest.raises(ValueError, match="no null text embedding"):
        tiny().null_text(2)


def test_drop_text_replaces_rows_with_the_null_embedding():
    model = tiny(null_text_embedding=True)
    _, _, text, mask = inputs(batch=4)
    g = torch.Generator().manual_seed(0)
    drop = torch.rand(4, generator=g) < 0.5
    new_text, new_mask = model.drop_text(text, mask, 0.5, generator=torch.Generator().manual_seed(0))
    assert 0 < drop.sum() < 4  # the seed drops some rows and keeps others
    assert torch.equal(new_text[drop], model.empty_text_embed.detach().expand(int(drop.sum()), -1, -1))
    assert torch.equal(new_text[~drop], text[~drop])
    assert new_mask[drop].all() and torch.equal(new_mask[~drop], mask[~drop])
    kept, _ = model.drop_text(text, mask, 0.0)
    assert torch.equal(kept, text)


def test_drop_text_rate():
    model = tiny(null_text_embedding=True)
    text = torch.randn(4000, TEXT_LEN, TEXT_DIM)
    new_text, _ = model.drop_text(text, None, 0.3, generator=torch.Generator().manual_seed(0))
    dropped = (new_text != text).flatten(1).any(dim=1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03  # binomial sd over 4000 rows: 0.0072


def test_training_forward_drops_captions_but_eval_does_not():
    model = tiny(null_text_embedding=True, text_drop_prob=0.3).eval()
    x, t, text, mask = inputs(batch=2)
    null_out = model(x, t, text=model.null_text(2)[0])
    cond_out = model(x, t, text=text, text_mask=mask)
    model.train()
    torch.manual_seed(0)
    calls = torch.stack([model(x, t, text=text, text_mask=mask) for _ in range(20)])  # [20, 2, K, N]
    dropped = (calls - null_out).flatten(2).abs().amax(-1) < 1e-5
    kept = (calls - cond_out).flatten(2).abs().amax(-1) < 1e-5
    assert torch.all(dropped ^ kept) and dropped.any() and kept.any()
    model.eval()
    torch.testing.assert_close(model(x, t, text=text, text_mask=mask), cond_out, rtol=0, atol=0)


def test_qk_init_std_sets_only_the_attention_queries_and_keys():
    """The option scales the query/key projections of both attentions at init; every other layer keeps 0.02."""
    config = dict(num_classes=K, grid_size=GRID, width=256, num_layers=2, num_heads=8, text_dim=64,
                  text_length=TEXT_LEN, num_steps=10)
    torch.manual_seed(0)
    scaled, released = DiffusionTransformer(**config, qk_init_std=0.0625), DiffusionTransformer(**config)
    for block in scaled.blocks:
        for attn in (block.attn1, block.attn2):
            for layer, std in ((attn.query, 0.0625), (attn.key, 0.0625), (attn.value, 0.02), (attn.proj, 0.02)):
                assert layer.weight.std().item() == pytest.approx(std, rel=0.03)  # >= 16k draws: rel. s.e. < 0.6%
    for name, p in released.named_parameters():
        if name.endswith(("query.weight", "key.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.03)
    with pytest.raises(ValueError, match="qk_init_std must be > 0"):
        DiffusionTransformer(**config, qk_init_std=0.0)


def test_text_drop_prob_needs_a_null_embedding():
    with pytest.raises(ValueError, match="null_text_embedding"):
        tiny(text_drop_prob=0.1)


def test_gradient_checkpointing_gives_identical_gradients():
    x, t, text, mask = inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing, null_text_embedding=True).train()
        model(x, t, text=text, text_mask=mask).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 30
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 5, dtype=torch.long)), "token ids"),
    (dict(t=torch.zeros(3, dtype=torch.long)), "t must be"),
    (dict(text=torch.zeros(2, TEXT_LEN, 5)), "text must be"),
    (dict(text_mask=torch.ones(2, 3, dtype=torch.bool)), "text_mask must be"),
    (dict(text=None), "needs text"),
    (dict(text=torch.zeros(3, TEXT_LEN, TEXT_DIM)), "the text's batch must be"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    model = tiny()
    x, t, text, mask = inputs(batch=2)
    args = {"x": x, "t": t, "text": text, "text_mask": mask, **bad}
    with pytest.raises(ValueError, match=match):
        model(args.pop("x"), args.pop("t"), **args)


def test_cache_text_rejects_a_caption_without_real_tokens():
    model = tiny()
    _, _, text, mask = inputs()
    mask[1] = False
    with pytest.raises(ValueError, match="no real token"):
        model.cache_text(text, mask)


def test_learns_tokens_from_text_and_position():
    """x0 depends on the caption (which of two patterns) and position; a masked input must be denoised."""
    torch.manual_seed(0)
    model = DiffusionTransformer(num_classes=4, grid_size=(2, 3), width=32, num_layers=2, num_heads=4,
                                 text_dim=8, text_length=3, num_steps=5)
    patterns = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 3, 2, 1, 1, 0]])
    captions = torch.randn(2, 3, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        which = torch.randint(0, 2, (16,), generator=g)
        x0 = patterns[which]
        masked = torch.rand(16, 6, generator=g) < 0.7
        x_t = torch.where(masked, torch.full_like(x0, 4), x0)
        loss = F.cross_entropy(model(x_t, torch.randint(0, 5, (16,), generator=g), text=captions[which]), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    all_masked = torch.full((2, 6), 4)
    prediction = model(all_masked, torch.tensor([4, 4]), text=captions).argmax(dim=1)
    assert torch.equal(prediction, patterns)
    assert loss.item() < 0.1
