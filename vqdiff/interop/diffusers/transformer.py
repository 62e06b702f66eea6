"""DiffusionTransformer <-> diffusers Transformer2DModel (discrete input, norm_type "ada_norm")."""

import logging

import torch

from ...models.transformer import DiffusionTransformer
from .common import DiffusersConversionError, load_exactly, rename, require_diffusers

log = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "geglu-approximate"}  # ours -> Transformer2DModel activation_fn
TRANSFORMER_RULES = [  # ours -> diffusers (scripts/convert_vq_diffusion_to_diffusers.py, reversed)
    (r"^content_emb\.", "latent_image_embedding."), (r"^blocks\.", "transformer_blocks."),
    (r"\.ln1\.", ".norm1."), (r"\.ln1_1\.", ".norm2."), (r"\.ln2\.", ".norm3."),
    (r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
    (r"\.(attn[12])\.proj\.", r".\1.to_out.0."),
    (r"\.mlp\.0\.", ".ff.net.0.proj."), (r"\.mlp\.2\.", ".ff.net.2."),
    (r"^to_logits\.0\.", "norm_out."), (r"^to_logits\.1\.", "out."),
]


def transformer_to_diffusers(network: DiffusionTransformer, ignore_padding_mask: bool = False,
                             text_scale: float = 1.0):
    """A Transformer2DModel computing the same log-probabilities as `network` (one timestep per call).

    `text_scale` is the text encoder's feature_scale: diffusers feeds the unit-norm features, so the cross-attention
    keys and values take the scale into their weights (the biases are unaffected)."""
    diffusers = require_diffusers()
    if network.factors is not None:
        raise DiffusersConversionError(f"this transformer factors its tokens ({list(network.factors)}); diffusers' "
                                       "Transformer2DModel has one embedding row and one output per token")
    block = network.blocks[0]
    width, heads = network.content_emb.emb.weight.shape[1], block.attn1.num_heads
    if block.mlp[0].out_features != 4 * width:
        raise DiffusersConversionError(f"the MLP is {block.mlp[0].out_features / width:g}x the width; diffusers' "
                                       "Transformer2DModel has a fixed 4x feed-forward (mlp_ratio 4)")
    if network.grid_size[0] != network.grid_size[1]:
        raise DiffusersConversionError(f"the token grid {network.grid_size} is not square; Transformer2DModel "
                                       "has one sample_size for height and width")
    if network.mask_text_padding and not ignore_padding_mask:
        raise DiffusersConversionError(
            "this transformer masks the text padding (transformer.mask_text_padding: true), but diffusers' "
            "VQDiffusionPipeline attends to all text positions, so its outputs would differ; pass "
            "--ignore-padding-mask (ignore_padding_mask=True) to convert anyway")
    if network.mask_text_padding:
        log.warning("converting a transformer trained with the text padding masked: diffusers attends to the "
                    "padding too, so its predictions will differ from vqdiff's")
    num_steps = block.ln1.num_steps
    model = diffusers.Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, num_layers=len(network.blocks),
        cross_attention_dim=network.text_dim, num_vector_embeds=network.num_classes + 1,
        sample_size=network.grid_size[0], num_embeds_ada_norm=num_steps, attention_bias=True,
        activation_fn=ACTIVATIONS[mlp_activation(network)], norm_type="ada_norm")
    state = {rename(k, TRANSFORMER_RULES): v for k, v in network.state_dict().items() if k != "empty_text_embed"}
    for i, blk in enumerate(network.blocks):  # a sinusoidal AdaLN equals the table of its values at t = 0..T-1
        for ours, theirs in (("ln1", "norm1"), ("ln1_1", "norm2")):
            key = f"transformer_blocks.{i}.{theirs}.emb.weight"
            if key not in state:
                with torch.no_grad():
                    state[key] = getattr(blk, ours).step_embedding(torch.arange(num_steps)).float()
    if text_scale != 1:
        for i in range(len(network.blocks)):
            for part in ("to_k", "to_v"):
                state[f"transformer_blocks.{i}.attn2.{part}.weight"] = \
                    state[f"transformer_blocks.{i}.attn2.{part}.weight"] * text_scale
    load_exactly(model, state, "the transformer in Transformer2DModel")
    return model.eval()


def mlp_activation(network: DiffusionTransformer) -> str:
    return "quick_gelu" if type(network.blocks[0].mlp[1]).__name__ == "QuickGELU" else "gelu"


def transformer_from_diffusers(model, null_text: torch.Tensor | None = None,
                               text_length: int = 77) -> DiffusionTransformer:
    """A DiffusionTransformer (time_embedding "table", no padding mask) holding a Transformer2DModel."""
    c = model.config
    problems = []
    if c.num_vector_embeds is None:
        problems.append("it does not take discrete tokens (num_vector_embeds is unset)")
    if c.norm_type != "ada_norm" and not (c.norm_type == "layer_norm" and c.num_embeds_ada_norm):
        problems.append(f"norm_type {c.norm_type!r} (vqdiff has AdaLN on a per-step table: 'ada_norm')")
    if c.activation_fn not in ACTIVATIONS.values():
        problems.append(f"activation_fn {c.activation_fn!r} (supported: {sorted(ACTIVATIONS.values())})")
    for name, want in (("attention_bias", True), ("only_cross_attention", False), ("double_self_attention", False),
                       ("norm_elementwise_affine", True), ("norm_eps", 1e-5), ("attention_type", "default")):
        if c[name] != want:
            problems.append(f"{name}={c[name]!r} (vqdiff: {want!r})")
    if null_text is not None and null_text.shape[0] != text_length:
        problems.append(f"the null text embedding has {null_text.shape[0]} positions, the text {text_length}")
    if problems:
        raise DiffusersConversionError("the Transformer2DModel has no vqdiff equivalent: " + "; ".join(problems))
    activation = {v: k for k, v in ACTIVATIONS.items()}[c.activation_fn]
    network = DiffusionTransformer(
        c.num_vector_embeds - 1, c.num_attention_heads * c.attention_head_dim, c.num_layers, c.num_attention_heads,
        grid_size=(c.sample_size, c.sample_size), text_dim=c.cross_attention_dim,
        text_length=text_length, num_steps=c.num_embeds_ada_norm,
        time_embedding="table", mlp_activation=activation, mask_text_padding=False,
        null_text_embedding=null_text is not None, dropout=c.dropout)
    theirs = model.state_dict()
    state = {k: theirs[rename(k, TRANSFORMER_RULES)] for k in network.state_dict() if k != "empty_text_embed"}
    if null_text is not None:
        state["empty_text_embed"] = null_text
    load_exactly(network, state, "the Transformer2DModel in DiffusionTransformer")
    return network.eval()
