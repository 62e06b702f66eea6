"""AdaLayerNorm, Attention and the MLP against float64 brute-force references."""

import math

import pytest
import torch

from vqdiff.models import layers
from vqdiff.models.layers import Activation, AdaLayerNorm, Attention, TimeEmbedding, attention, mlp


def layer_norm_reference(x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_ada_layer_norm_matches_scale_then_shift_reference():
    torch.manual_seed(0)
    norm = AdaLayerNorm(8, num_steps=10).double()
    torch.nn.init.normal_(norm.linear.weight)
    torch.nn.init.normal_(norm.linear.bias)
    x, t = torch.randn(3, 5, 8, dtype=torch.float64), torch.tensor([0, 4, 9])
    h = norm.emb.weight[t]
    h = h * torch.sigmoid(h)  # SiLU
    scale_shift = h @ norm.linear.weight.T + norm.linear.bias
    scale, shift = scale_shift[:, :8], scale_shift[:, 8:]  # first half scale, second half shift
    expected = layer_norm_reference(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(norm(x, t), expected, rtol=1e-12, atol=1e-12)


def test_ada_layer_norm_uses_each_samples_own_step():
    norm = AdaLayerNorm(8, num_steps=10)
    torch.nn.init.normal_(norm.emb.weight)
    x = torch.randn(1, 5, 8).expand(2, -1, -1)
    out = norm(x, torch.tensor([2, 7]))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out[1], norm(x[:1], torch.tensor([7]))[0])


def test_sinusoidal_ada_layer_norm_has_no_table_and_depends_on_t():
    norm = AdaLayerNorm(8, num_steps=100, time_embedding="sinusoidal")
    assert norm.time_embedding is TimeEmbedding.SINUSOIDAL
    assert set(dict(norm.named_parameters())) == {"linear.weight", "linear.bias"}
    torch.nn.init.normal_(norm.linear.weight)
    x = torch.randn(1, 4, 8).expand(2, -1, -1)
    out = norm(x, torch.tensor([0, 50]))
    assert not torch.allclose(out[0], out[1])


def test_unknown_time_embedding_is_rejected():
    with pytest.raises(ValueError, match="fourier"):
        AdaLayerNorm(8, 10, time_embedding="fourier")


def attention_reference(x, context, attn: Attention, mask=None):
    """Per-head softmax(q k^T / sqrt(d)) v in float64, one head and one sample at a time."""
    w = {name: getattr(attn, name) for name in ("query", "key", "value", "proj")}
    q = x @ w["query"].weight.T + w["query"].bias
    k = context @ w["key"].weight.T + w["key"].bias
    v = context @ w["value"].weight.T + w["value"].bias
    heads, head_dim = attn.num_heads, q.shape[-1] // attn.num_heads
    out = torch.zeros_like(q)
    for b in range(x.shape[0]):
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)  # [N, L]
            if mask is not None:
                scores = scores.masked_fill(~mask[b][None], float("-inf"))
            out[b, :, cols] = torch.softmax(scores, dim=-1) @ v[b, :, cols]
    return out @ w["proj"].weight.T + w["proj"].bias


def test_self_attention_matches_reference_and_is_bidirectional():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out = attn(x)
    torch.testing.assert_close(out, attention_reference(x, x, attn), rtol=1e-10, atol=1e-10)
    x2 = x.clone()
    x2[:, -1] += 1.0  # the last token is seen by the first: no causal mask
    assert not torch.allclose(attn(x2)[:, 0], out[:, 0])


def test_cross_attention_with_padding_mask_and_precomputed_key_value():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, context_dim=12).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, context = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 12, dtype=torch.float64)
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    out = attn(x, context=context, mask=mask[:, None, None])
    torch.testing.assert_close(out, attention_reference(x, context, attn, mask), rtol=1e-10, atol=1e-10)
    key_value = attn.key_value(context)
    assert key_value.shape == (2, 2, 2, 7, 8)
    torch.testing.assert_close(attn(x, key_value=key_value, mask=mask[:, None, None]), out, rtol=0, atol=1e-12)


def test_bfloat16_attention_on_cpu_runs_in_float32_and_matches_the_reference():
    # attention() computes bfloat16 inputs in float32 (the CPU's bfloat16 kernel is slow): the result is the
    # float64 reference rounded to bfloat16 once, and gradients reach every input
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 1, 6) > 0.3
    mask[..., 0] = True
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(*low, mask)
    assert out.dtype == torch.bfloat16
    scores = (low[0].double() @ low[1].double().transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    reference = scores.softmax(-1) @ low[2].double()
    torch.testing.assert_close(out.double(), reference.bfloat16().double(), rtol=2 ** -7, atol=1e-6)  # one rounding
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0 for x in low)


def test_attention_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, num_heads=4)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_mlp_layout_and_activation(activation):
    torch.manual_seed(0)
    net = mlp(6, ratio=4, activation=activation).double()
    assert [k for k in net.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert net[0].weight.shape == (24, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    h = x @ net[0].weight.T + net[0].bias
    if Activation(activation) is Activation.QUICK_GELU:
        h = h * torch.sigmoid(1.702 * h)
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    torch.testing.assert_close(net(x), h @ net[2].weight.T + net[2].bias, rtol=1e-12, atol=1e-12)


def test_mlp_runs_long_inputs_in_pieces_outside_training(monkeypatch):
    """Outside training on CPU, rows beyond MLP_CHUNK_ELEMENTS of hidden activations go through in pieces (each
    under glibc's mmap threshold): the same values, in training one piece."""
    monkeypatch.setattr(layers, "MLP_CHUNK_ELEMENTS", 24 * 4)  # 4 rows of the 24-wide hidden layer per piece
    torch.manual_seed(0)
    net = mlp(6, ratio=4).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)  # 10 rows: pieces of 4, 4, 2
    pieces = []
    net[0].register_forward_hook(lambda m, args, out: pieces.append(args[0].shape[0]))
    expected = torch.nn.Sequential.forward(net, x)
    pieces.clear()
    torch.testing.assert_close(net.eval()(x), expected, rtol=0, atol=1e-14)
    assert pieces == [4, 4, 2]
    pieces.clear()
    net.train()(x)
    assert pieces == [2]  # the whole [2, 5, 6] input at once
