"""The layered tokenizer (outline x colour codes) and the transformer that factors its tokens."""

import pytest
import torch

from vqdiff.data.shapes import COLOURS, coverage
from vqdiff.models.layered_codec import ink_density
from vqdiff.models.transformer import DiffusionTransformer
from vqdiff.models.vqvae import GumbelVQVAE

LAYERED = dict(resolution=16, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], z_channels=16,
               norm_groups=8, embedding_dim=16, num_embeddings=24, factors=[6, 4], encoder="layered",
               decoder="layered")


def layered(seed: int = 0) -> GumbelVQVAE:
    torch.manual_seed(seed)
    return GumbelVQVAE.from_config(LAYERED).double().eval()


def drawing(colour: str, shape: str = "triangle", size: int = 16) -> torch.Tensor:
    """One shape blended over white in float64, no rounding: white + alpha * (colour - white), in [-1, 1]."""
    alpha = torch.from_numpy(coverage(shape, (7.3, 8.6), 9.0, (0, 0, size, size), 4))  # [H, W]
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float64) / 127.5 - 1
    return (1 + alpha[None] * (rgb[:, None, None] - 1))[None]  # [1, 3, H, W]


def test_ink_density_is_colour_blind_and_reads_coverage():
    """Every palette colour gives the same ink map, equal to the shape's coverage (float64)."""
    alpha = torch.from_numpy(coverage("triangle", (7.3, 8.6), 9.0, (0, 0, 16, 16), 4))
    for colour in COLOURS:
        torch.testing.assert_close((ink_density(drawing(colour))[0, 0] + 1) / 2, alpha, rtol=0, atol=1e-12)
    blank = torch.ones(1, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(ink_density(blank), -torch.ones(1, 1, 16, 16, dtype=torch.float64))


def test_outline_codes_ignore_colour_and_colour_codes_see_only_their_patch():
    model = layered()
    red, blue = (model.quantize.factor_logits(model.encoder(drawing(c))) for c in ("red", "blue"))
    torch.testing.assert_close(red[0], blue[0], rtol=0, atol=1e-9)  # the same outline logits
    assert not torch.allclose(red[1], blue[1])  # the colour factor tells them apart
    # a pixel changed in one 4x4 patch moves the colour logits of that patch only
    x = drawing("red")
    y = x.clone()
    y[0, 1, 5, 9] = 0.3  # patch (1, 2)
    changed = (model.quantize.factor_logits(model.encoder(y))[1]
               - model.quantize.factor_logits(model.encoder(x))[1]).abs().amax(1)[0]  # [h, w]
    assert changed[1, 2] > 0 and changed.flatten().count_nonzero() == 1


def test_a_colour_code_draws_only_its_patch_and_keeps_the_alpha():
    """Decoding (outline, colour) with one token's colour changed: pixels move only inside that token's patch, and
    there 1 - pixel scales by one factor per channel (same alpha, another colour)."""
    model = layered()
    outline = torch.randint(0, 6, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    colour = torch.randint(0, 4, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    tokens = outline * 4 + colour
    other = tokens.clone()
    other[0, 2, 1] = outline[0, 2, 1] * 4 + (colour[0, 2, 1] + 1) % 4
    a, b = model.decoder(model.embed_tokens(tokens)), model.decoder(model.embed_tokens(other))
    moved = (a - b).abs().amax(1)[0] > 1e-12  # [H, W]
    assert moved[8:12, 4:8].any() and not moved[:, :4].any() and not moved[:8].any() and not moved[12:].any()
    ratio = (1 - b[0, :, 8:12, 4:8]) / (1 - a[0, :, 8:12, 4:8])  # [3, 4, 4]: constant per channel
    torch.testing.assert_close(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-9, atol=1e-9)


def test_layered_round_trip_keeps_every_pair(tmp_path):
    from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
    model = layered().float()
    kept = model.trim(torch.zeros(24, dtype=torch.long), min_count=0)
    loaded = load_tokenizer(save_tokenizer(kept, tmp_path / "tok"))
    tokens = torch.arange(24).view(1, 4, 6)
    torch.testing.assert_close(loaded.decode(tokens), model.decode(tokens))
    assert loaded.config["encoder"] == "layered" and loaded.quantize.factors == (6, 4)


@pytest.mark.parametrize("change, message", [
    (dict(decoder="taming"), "both be 'layered'"),
    (dict(factors=None), "needs factors"),
])
def test_layered_needs_both_halves_and_factors(change, message):
    with pytest.raises(ValueError, match=message):
        GumbelVQVAE.from_config({**LAYERED, **change})


def test_factored_transformer_predicts_a_product_and_embeds_a_sum():
    """log p(i, j) = log p_first(i) + log p_second(j) against the brute-force product (float64); token (i, j)
    embeds as first[i] + second[j]; [MASK] has its own row."""
    torch.manual_seed(0)
    net = DiffusionTransformer(num_classes=24, width=32, num_layers=1, num_heads=4, grid_size=(2, 2), text_dim=8,
                               text_length=3, factors=(6, 4)).double()
    x = torch.tensor([[0, 23, 24, 13]])
    logits = net(x, torch.tensor([5]), torch.randn(1, 3, 8, dtype=torch.float64))
    assert logits.shape == (1, 24, 4)
    h = net.content_emb(x)
    for block in net.blocks:
        h = block(h, torch.tensor([5]), torch.randn(1, 3, 8, dtype=torch.float64), None, None)
    # the head's two parts, by hand
    raw = net.to_logits(h)[0].double()  # [N, 10]
    brute = torch.stack([(raw[:, :6].softmax(-1)[:, i] * raw[:, 6:].softmax(-1)[:, j]) for i in range(6)
                         for j in range(4)], 0)  # [24, N]
    # logits come back in float32 (as every network output), so compare at its precision
    torch.testing.assert_close(net.logits(h)[0].double().softmax(0), brute, rtol=0, atol=1e-6)
    emb, position = net.content_emb, net.content_emb.height_emb.weight[0] + net.content_emb.width_emb.weight[1]
    rows = emb(torch.tensor([[0, 13, 0, 0], [0, 24, 0, 0]]))[:, 1] - position
    torch.testing.assert_close(rows[0], emb.emb_first.weight[3] + emb.emb_second.weight[1])
    torch.testing.assert_close(rows[1], emb.emb_mask.detach())
    with pytest.raises(ValueError, match="multiply to num_classes"):
        DiffusionTransformer(num_classes=25, width=32, num_layers=1, num_heads=4, factors=(6, 4))


def test_an_unused_code_restarts_as_a_copy_of_the_code_with_the_most_error():
    """After `restart_every` training calls, the first never-picked code of each factor takes the embedding (plus
    noise of 1% of the table's std) and the logit weights of the code with the largest summed error, and the
    counts start over."""
    torch.manual_seed(0)
    model = GumbelVQVAE.from_config(LAYERED).train()
    q = model.quantize
    ids = torch.tensor([[[0 * 4 + 1, 2 * 4 + 1], [5 * 4 + 3, 5 * 4 + 3]]])  # outlines {0, 2, 5}, colours {1, 3}
    error = torch.tensor([[[0.1, 0.2], [0.9, 0.8]]])
    for _ in range(q.restart_every - 1):
        q.restart_unused()
        q.observe(ids, error)
    assert q.usage[:6].tolist() == [99, 0, 99, 0, 0, 198] and q.usage[6:].tolist() == [0, 198, 0, 198]
    before = {name: p.detach().clone() for name, p in q.named_parameters()}
    q.restart_unused()
    # outline: code 1 (first unused) copies code 5 (error 1.7 per call); colour: code 0 copies code 3
    for embed, proj, target, donor in (("embed_first", "proj", 1, 5), ("embed_second", "proj_second", 0, 3)):
        table = before[f"{embed}.weight"]
        noise = getattr(q, embed).weight[target] - table[donor]
        assert 0 < noise.abs().max() < 0.1 * table.std()
        assert torch.equal(getattr(q, proj).weight[target], before[f"{proj}.weight"][donor])
        untouched = [i for i in range(table.shape[0]) if i != target]
        assert torch.equal(getattr(q, embed).weight[untouched], table[untouched])
    assert q.usage.sum() == 0 and q.error.sum() == 0
    # a training forward pass counts its own codes
    model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert q.usage[:6].sum() == 2 * 16 and q.usage[6:].sum() == 2 * 16
