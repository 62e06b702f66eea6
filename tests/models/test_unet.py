"""The DDPM UNet: shapes, the CIFAR-10 parameter count, conditioning semantics, checkpointing, and that it learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqdiff.models.unet import AttentionBlock, UNet, unet_preset


SMALL = dict(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), num_res_blocks=1, dropout=0.0, image_size=16)


def randomise_zero_inits(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill the zero-initialised output layers so conditioning paths actually reach the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("kwargs, in_ch, out_ch, size", [
    (dict(SMALL), 3, 3, 16),
    (dict(SMALL, learn_sigma=True), 3, 6, 16),
    (dict(SMALL, num_classes=10), 3, 3, 16),
    (dict(SMALL, context_dim=24, num_head_channels=16), 3, 3, 16),
    (dict(SMALL, resblock_updown=True, use_scale_shift_norm=True, num_heads=4), 3, 3, 16),
    (dict(SMALL, ch_mult=(1, 2, 2), in_channels=1, out_channels=1, image_size=28, attn_resolutions=(14,)), 1, 1, 28),
])
def test_output_shape(kwargs, in_ch, out_ch, size):
    model = UNet(**kwargs)
    x = torch.randn(2, in_ch, size, size)
    cond = {}
    if kwargs.get("num_classes"):
        cond["y"] = torch.tensor([0, 9])
    if kwargs.get("context_dim"):
        cond["text"] = torch.randn(2, 5, kwargs["context_dim"])
        cond["text_mask"] = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(x, torch.tensor([0, 999]), **cond)
    assert out.shape == (2, out_ch, size, size)
    assert torch.isfinite(out).all()


def test_zero_initialised_output():
    """improved-diffusion zero-inits the output conv: an untrained network predicts exactly zero."""
    model = UNet(**SMALL)
    assert torch.equal(model(torch.randn(2, 3, 16, 16), torch.tensor([3, 7])), torch.zeros(2, 3, 16, 16))


def test_ddpm_cifar10_parameter_count():
    """Ho et al. 2020 report 35.7M parameters for their CIFAR-10 model (35,746,307 in the released code)."""
    with torch.device("meta"):
        model = UNet(**unet_preset("ddpm_cifar10"))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 35.7e6) / 35.7e6 < 0.01
    assert count == 35_746_307
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet().parameters()) == count


@pytest.mark.parametrize("name", ["tiny_mnist", "tiny_cifar10", "tiny_64"])
def test_presets_run(name):
    kwargs = unet_preset(name)
    model = UNet(**kwargs)
    size = kwargs["image_size"]
    out = model(torch.randn(1, kwargs["in_channels"], size, size), torch.tensor([5]))
    assert out.shape == (1, kwargs["out_channels"], size, size)
    assert sum(p.numel() for p in model.parameters()) < 2e6


def test_attention_block_matches_brute_force():
    """Heads, text keys/values and the padding mask against an explicit float64 softmax attention."""
    torch.manual_seed(0)
    block = randomise_zero_inits(AttentionBlock(channels=8, num_heads=2, context_dim=5)).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    text = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = block(x, text, mask)

    h = block.norm(x).reshape(2, 8, 9)
    q, k, v = (block.qkv.weight[:, :, 0] @ h + block.qkv.bias[:, None]).chunk(3, dim=1)  # [B, 8, 9]
    text_k, text_v = (text @ block.text_kv.weight.T + block.text_kv.bias).transpose(1, 2).chunk(2, dim=1)
    expected = torch.empty(2, 8, 9, dtype=torch.float64)
    for b in range(2):
        keep = mask[b].nonzero().flatten()
        keys = torch.cat([k[b], text_k[b][:, keep]], dim=1)  # [8, 9 + L_b]
        values = torch.cat([v[b], text_v[b][:, keep]], dim=1)
        for head in range(2):
            rows = slice(4 * head, 4 * head + 4)
            weights = torch.softmax(q[b, rows].T @ keys[rows] / math.sqrt(4), dim=1)  # [9, 9 + L_b]
            expected[b, rows] = (weights @ values[rows].T).T
    expected = x + (block.proj_out.weight[:, :, 0] @ expected + block.proj_out.bias[:, None]).reshape(2, 8, 3, 3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def text_model():
    torch.manual_seed(1)
    return randomise_zero_inits(UNet(**SMALL, context_dim=12)).eval()


def test_text_padding_does_not_influence_output():
    model = text_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    text = torch.randn(2, 6, 12)
    mask = torch.tensor([[True, True, True, True, False, False], [True, True, False, False, False, False]])
    with torch.no_grad():
        out = model(x, t, text=text, text_mask=mask)
        changed_padding = text.clone()
        changed_padding[~mask] = 100 * torch.randn(int((~mask).sum()), 12)
        torch.testing.assert_close(model(x, t, text=changed_padding, text_mask=mask), out, rtol=0, atol=1e-6)
        changed_real = text.clone()
        changed_real[:, 0] += 1.0
        assert (model(x, t, text=changed_real, text_mask=mask) - out).abs().amax() > 1e-3


def test_all_masked_text_is_the_unconditional_network():
    model = text_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        out = model(x, t, text=torch.randn(2, 6, 12), text_mask=torch.zeros(2, 6, dtype=torch.bool))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, model(x, t), rtol=0, atol=1e-6)


def test_class_labels_and_null_class():
    torch.manual_seed(2)
    model = randomise_zero_inits(UNet(**SMALL, num_classes=3)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, y=torch.full((2,), model.null_class)))
        assert (model(x, t, y=torch.tensor([0, 0])) - model(x, t, y=torch.tensor([1, 1]))).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="labels in"):
        model(x, t, y=torch.tensor([0, 4]))


def test_timesteps_integer_float_and_effect():
    torch.manual_seed(3)
    model = randomise_zero_inits(UNet(**SMALL)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([7, 300]))
        torch.testing.assert_close(out, model(x, torch.tensor([7.0, 300.0])))
        assert (out - model(x, torch.tensor([8, 300]))).abs()[0].amax() > 1e-4  # the time embedding matters


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randn(2, 3, 15, 16), torch.zeros(2)), "divisible"),
    (lambda m: m(torch.randn(2, 1, 16, 16), torch.zeros(2)), r"\[B, 3, H, W\]"),
    (lambda m: m(torch.randn(2, 3, 16, 16), torch.zeros(3)), "t must"),
    (lambda m: m(torch.randn(2, 3, 16, 16), torch.zeros(2), y=torch.zeros(2, dtype=torch.long)), "num_classes"),
    (lambda m: m(torch.randn(2, 3, 16, 16), torch.zeros(2), text=torch.randn(2, 3, 4)), "context_dim"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call(UNet(**SMALL))


def test_gradient_checkpointing_gives_identical_gradients():
    """Checkpointing recomputes activations (with the same dropout masks): same loss, same gradients."""
    kwargs = dict(SMALL, context_dim=8, dropout=0.1, use_scale_shift_norm=True)
    torch.manual_seed(4)
    plain = randomise_zero_inits(UNet(**kwargs))
    checkpointed = UNet(**kwargs, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([1, 900]), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    grads, saved = [], []
    for model in (plain, checkpointed):
        count = [0]

        def pack(tensor):
            count[0] += 1
            return tensor

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x, t, text=text, text_mask=mask)
        out.square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        saved.append(count[0])
    assert saved[1] < saved[0] / 3  # blocks keep only their inputs: checkpointing is really on
    assert all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_small_unet_overfits_one_batch():
    """A small UNet memorises a fixed batch of smooth targets: the loss falls at least 10x in 30 Adam steps
    (about 30x with seeds 6-9)."""
    torch.manual_seed(6)
    model = UNet(**dict(SMALL, image_size=8, attn_resolutions=(4,)), num_classes=4)
    x = torch.randn(4, 3, 8, 8)
    t, y = torch.tensor([0, 250, 500, 999]), torch.arange(4)
    grid = torch.linspace(-1, 1, 8)
    target = torch.stack([torch.sin(3 * grid[:, None] + k) * torch.cos(2 * grid[None] - k) for k in range(4)])
    target = target[:, None].expand(4, 3, 8, 8) * torch.tensor([1.0, -0.5, 0.25])[:, None, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x, t, y=y), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses


def test_null_caption_and_caption_dropping():
    """A text UNet with text_length has a learned null caption (all-True mask); in training each caption is
    swapped for it with probability text_drop_prob, row by row, as the DiffusionTransformer does."""
    torch.manual_seed(7)
    model = randomise_zero_inits(UNet(**SMALL, context_dim=12, text_length=6, text_drop_prob=0.5))
    null, null_mask = model.null_text(8)
    assert null.shape == (8, 6, 12) and null_mask.shape == (8, 6) and null_mask.all()
    x, t = torch.randn(8, 3, 16, 16), torch.arange(8) * 100
    text, mask = torch.randn(8, 6, 12), torch.ones(8, 6, dtype=torch.bool)
    mask[:, 4:] = False
    with torch.no_grad():
        conditional = model.eval()(x, t, text=text, text_mask=mask)
        unconditional = model(x, t, text=null, text_mask=null_mask)
        torch.manual_seed(0)
        dropped = model.train()(x, t, text=text, text_mask=mask)
    is_conditional = [torch.allclose(d, c, atol=1e-5) for d, c in zip(dropped, conditional)]
    is_null = [torch.allclose(d, u, atol=1e-5) for d, u in zip(dropped, unconditional)]
    assert all(a != b for a, b in zip(is_conditional, is_null))  # every row is exactly one of the two
    assert 0 < sum(is_null) < 8, is_null
    plain = UNet(**SMALL, context_dim=12)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == 6 * 12


def test_null_caption_arguments_are_checked():
    with pytest.raises(ValueError, match="needs text conditioning"):
        UNet(**SMALL, text_length=6)
    with pytest.raises(ValueError, match="needs text_length"):
        UNet(**SMALL, context_dim=12, text_drop_prob=0.1)
    with pytest.raises(ValueError, match="no null caption"):
        UNet(**SMALL, context_dim=12).null_text(2)
    model = UNet(**SMALL, context_dim=12, text_length=6, text_drop_prob=0.1).train()
    with pytest.raises(ValueError, match="text of length 6"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2), text=torch.randn(2, 5, 12))


def test_position_embedding_lets_a_blank_image_map_to_any_pattern():
    """From a blank input, a UNet without position embedding can only tell pixels apart by their distance to the
    borders, so it cannot paint a random pattern; with it, each pixel has its own learned input."""
    target = (torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float().expand(4, -1, -1, -1)
    losses = {}
    for position in (False, True):
        torch.manual_seed(0)
        model = UNet(in_channels=1, out_channels=1, ch=16, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1,
                     dropout=0.0, image_size=16, position_embedding=position)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = F.mse_loss(model(torch.zeros(4, 1, 16, 16), torch.zeros(4)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[position] = loss.item()
    assert losses[True] < 0.02 and losses[False] > 5 * losses[True], losses
    with pytest.raises(ValueError, match=r"takes \[16, 16\] images, got \[8, 8\]"):
        model(torch.zeros(1, 1, 8, 8), torch.zeros(1))
