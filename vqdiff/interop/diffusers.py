"""vqdiff text-to-image parts <-> a diffusers `VQDiffusionPipeline` folder (model_index.json + one folder per part).

    transformer/   Transformer2DModel (discrete input, norm_type "ada_norm")   <-> DiffusionTransformer
    vqvae/         VQModel (decoder + codebook; nearest-neighbour encoder)    <-> GumbelVQVAE
    text_encoder/  transformers CLIPTextModel, tokenizer/ CLIPTokenizer       <-> CLIPTextEncoder (open_clip names)
    scheduler/     VQDiffusionScheduler (num_vec_classes = K + 1)             <-> discrete.num_timesteps / schedule
    learned_classifier_free_sampling_embeddings/                              <-> empty_text_embed

What diffusers cannot hold exactly is refused with the reason: an MLP ratio other than 4, a key-padding mask over
the text (diffusers attends to all positions; `ignore_padding_mask=True` converts anyway), unnormalised text features.
A sinusoidal AdaLN time embedding becomes its (equal) per-step table. VQModel has no Gumbel code logits, so the
export also writes `vqvae/vqdiff_gumbel.safetensors` (our quant_conv, quantize.proj, full codebook, code map and
config) that brings the exact encoder back on import; diffusers ignores that file and encodes by nearest neighbour.
A VQModel without it is imported with code logits 2 e_k.z - |e_k|^2, whose argmax is its nearest-neighbour code.
Key maps and loading only; diffusers and transformers are imported inside the functions (optional dependency).
"""

import copy
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ExperimentConfig, ModelType, Network, TextEncoderConfig, TransformerConfig
from ..diffusion.schedules import MASK_AND_REPLACE_PRESETS
from ..models.loading import load_exactly as load_checked
from ..models.text import CUSTOM_TEXT_TOWERS, PAD_ID, CLIPTextEncoder, TextBackend, sized_text_arch
from ..models.transformer import DiffusionTransformer
from ..models.vqvae import GumbelVQVAE

log = logging.getLogger(__name__)

GUMBEL_FILE = "vqdiff_gumbel.safetensors"  # beside vqvae/diffusion_pytorch_model.safetensors
CLIP_VOCAB_SIZE = 49408  # open_clip's BPE: 256 bytes, 256 word-final bytes, 48,894 merges, start and end of text
PAD_TOKEN = "<|pad|>"  # an extra token whose embedding is row 0: pads like vqdiff without splitting "!" out of text
CF_FOLDER = "learned_classifier_free_sampling_embeddings"
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "geglu-approximate"}  # ours -> Transformer2DModel activation_fn
CLIP_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}  # open_clip MLP module class -> HF hidden_act
# erf-GELU open_clip text towers an imported CLIPTextModel may become, by (width, layers, heads); any QuickGELU
# size has one (text.sized_text_arch)
GELU_TEXT_TOWERS = {
    **{(c["width"], c["layers"], c["heads"]): name for name, c in CUSTOM_TEXT_TOWERS.items()},
    (512, 12, 8): "ViT-B-32", (768, 12, 12): "ViT-L-14", (1024, 24, 16): "ViT-H-14",
}


class DiffusersConversionError(ValueError):
    """A model that a VQDiffusionPipeline folder cannot hold exactly, or a folder vqdiff cannot read."""


def require_diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise DiffusersConversionError("converting to or from diffusers needs the optional `diffusers` package "
                                       "(pip install -e '.[dev]', or pip install diffusers)") from error
    return diffusers


def load_exactly(module: nn.Module, state: dict, what: str) -> None:
    load_checked(module, state, what, error=DiffusersConversionError)


def rename(key: str, rules: list) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


# ---- transformer ----------------------------------------------------------------------------------

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


# ---- image tokenizer ------------------------------------------------------------------------------

def vq_rules(levels: int) -> list:
    """GumbelVQVAE (taming names) -> VQModel; the decoder's up.i runs (levels - 1 - i)-th in diffusers."""
    return [
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."),
        (r"^(decoder\.up_blocks\.\d+)\.block\.", r"\1.resnets."),
        (r"^(decoder\.up_blocks\.\d+)\.attn\.", r"\1.attentions."),
        (r"^(decoder\.up_blocks\.\d+)\.upsample\.", r"\1.upsamplers.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."), (r"\.norm_out\.", ".conv_norm_out."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.q\.", r"\1.to_q."),
        (r"(attentions\.\d+)\.k\.", r"\1.to_k."), (r"(attentions\.\d+)\.v\.", r"\1.to_v."),
        (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    ]


def shared_vq_keys(tokenizer: GumbelVQVAE) -> dict[str, str]:
    """Our encoder/decoder/post_quant_conv keys -> VQModel keys (quant_conv and the quantizer differ)."""
    rules = vq_rules(len(tokenizer.config["ch_mult"]))
    return {k: rename(k, rules) for k in tokenizer.state_dict() if k.startswith(("encoder.", "decoder.", "post_"))}


def attention_levels(tokenizer: GumbelVQVAE) -> list[bool]:
    return [len(level.attn) > 0 for level in tokenizer.encoder.down]


def codec_to_diffusers(tokenizer: GumbelVQVAE):
    """(VQModel decoding our token ids like `tokenizer.decode`, the tensors VQModel lacks for our encoder)."""
    diffusers = require_diffusers()
    c = tokenizer.config
    if c["ch_mult"][0] != 1:
        raise DiffusersConversionError(f"ch_mult {c['ch_mult']} starts above 1; diffusers' Encoder goes straight "
                                       "to the first level's width in conv_in")
    attn = attention_levels(tokenizer)
    model = diffusers.VQModel(
        in_channels=c["in_channels"], out_channels=c["out_channels"], layers_per_block=c["num_res_blocks"],
        down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D") for a in attn],
        up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D") for a in reversed(attn)],
        block_out_channels=[c["ch"] * m for m in c["ch_mult"]], latent_channels=c["z_channels"],
        sample_size=c["resolution"], num_vq_embeddings=tokenizer.num_embeddings, norm_num_groups=c["norm_groups"],
        vq_embed_dim=c["embedding_dim"])
    ours = tokenizer.state_dict()
    theirs = model.state_dict()
    state = {name: ours[key].reshape(theirs[name].shape) for key, name in shared_vq_keys(tokenizer).items()}
    state["quantize.embedding.weight"] = tokenizer.quantize.codebook(tokenizer.code_map)
    if c["z_channels"] == c["embedding_dim"]:
        state.update({f"quant_conv.{p}": ours[f"quant_conv.{p}"] for p in ("weight", "bias")})
    else:  # VQModel's quant_conv maps to the codebook width; ours keeps z_channels and feeds the code logits
        log.warning("z_channels %d != embedding_dim %d: VQModel.encode gets a zero quant_conv (it cannot hold ours); "
                    "decoding is exact", c["z_channels"], c["embedding_dim"])
        state.update({f"quant_conv.{p}": torch.zeros_like(theirs[f"quant_conv.{p}"]) for p in ("weight", "bias")})
    load_exactly(model, state, "the Gumbel codec in VQModel")
    extras = {k: v.contiguous() for k, v in ours.items()
              if k.startswith(("quant_conv.", "quantize.")) or k == "code_map"}
    return model.eval(), extras


def codec_from_diffusers(model, extras: dict | None, config: dict | None, resolution: int) -> GumbelVQVAE:
    """A GumbelVQVAE holding a VQModel. With `extras`/`config` from our export the encoder is ours again;
    otherwise the code logits are 2 e_k . z - |e_k|^2 over VQModel's quant_conv output (nearest neighbour)."""
    c = model.config
    if config is None:
        config = generic_codec_config(c, resolution)
    tokenizer = GumbelVQVAE.from_config(config)
    theirs = model.state_dict()
    own = tokenizer.state_dict()
    state = {key: theirs[name].reshape(own[key].shape) for key, name in shared_vq_keys(tokenizer).items()}
    codebook = theirs["quantize.embedding.weight"]  # [K', D]
    if extras is not None:
        state.update(extras)
        full = extras["quantize.embed.weight"].clone()
        full[extras.get("code_map", slice(None))] = codebook  # VQModel's rows are the ones diffusers decodes with
        state["quantize.embed.weight"] = full
    else:
        w, b = theirs["quant_conv.weight"].flatten(1).double(), theirs["quant_conv.bias"].double()  # [D, z], [D]
        e = codebook.double()
        state["quant_conv.weight"] = torch.eye(config["z_channels"])[..., None, None]
        state["quant_conv.bias"] = torch.zeros(config["z_channels"])
        state["quantize.proj.weight"] = (2 * e @ w).float()[..., None, None]
        state["quantize.proj.bias"] = (2 * e @ b - e.square().sum(1)).float()
        state["quantize.embed.weight"] = codebook
    load_exactly(tokenizer, state, "the VQModel in GumbelVQVAE")
    return tokenizer.eval()


def generic_codec_config(c, resolution: int) -> dict:
    """A GumbelVQVAE config with the layout of a VQModel config, or an error naming what does not fit."""
    attn = [t.startswith("Attn") for t in c.down_block_types]
    problems = []
    if c.norm_type != "group" or c.act_fn != "silu" or not c.mid_block_add_attention:
        problems.append(f"norm_type {c.norm_type!r}, act_fn {c.act_fn!r}, mid_block_add_attention "
                        f"{c.mid_block_add_attention} (needs 'group', 'silu', True)")
    if [t.startswith("Attn") for t in reversed(c.up_block_types)] != attn:
        problems.append(f"the decoder's attention levels {list(c.up_block_types)} do not mirror the encoder's "
                        f"{list(c.down_block_types)}")
    unknown = set(c.down_block_types) - {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
    unknown |= set(c.up_block_types) - {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    ch = c.block_out_channels[0]
    if unknown or any(width % ch for width in c.block_out_channels):
        problems.append(f"block types {sorted(unknown)} or widths {list(c.block_out_channels)} not multiples of "
                        f"the first")
    if problems:
        raise DiffusersConversionError("this VQModel has no vqdiff tokenizer equivalent (GumbelVQVAE, taming "
                                       "layout): " + "; ".join(problems))
    levels = len(c.block_out_channels)
    return dict(
        resolution=resolution, in_channels=c.in_channels, out_channels=c.out_channels, ch=ch,
        ch_mult=[w // ch for w in c.block_out_channels], num_res_blocks=c.layers_per_block,
        attn_resolutions=[resolution // 2 ** i for i in range(levels) if attn[i]], z_channels=c.latent_channels,
        dropout=0.0, norm_groups=c.norm_num_groups, embedding_dim=c.vq_embed_dim or c.latent_channels,
        num_embeddings=c.num_vq_embeddings, straight_through=True, kl_weight=1e-8, temperature=1.0,
        num_kept_codes=None)


# ---- text encoder ---------------------------------------------------------------------------------

def clip_vocabulary(simple_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's SimpleTokenizer (its bpe_simple_vocab_16e6.txt.gz) -> the HF vocabulary and merges, in rank order."""
    special = {simple_tokenizer.sot_token_id: "<|startoftext|>", simple_tokenizer.eot_token_id: "<|endoftext|>"}
    vocab = {special.get(i, token): i for token, i in simple_tokenizer.encoder.items()}
    return vocab, sorted(simple_tokenizer.bpe_ranks, key=simple_tokenizer.bpe_ranks.get)


def hf_prefix(model) -> str:
    """transformers 5 keeps CLIPTextModel's parts at the top; earlier versions under `text_model`."""
    return "text_model." if hasattr(model, "text_model") else ""


def open_clip_to_hf(state: dict, layers: int, prefix: str) -> dict:
    """open_clip text-tower names -> CLIPTextModel names (the fused in_proj split into q, k, v)."""
    out = {f"{prefix}embeddings.token_embedding.weight": state.pop("token_embedding.weight"),
           f"{prefix}embeddings.position_embedding.weight": state.pop("positional_embedding")}
    for p in ("weight", "bias"):
        out[f"{prefix}final_layer_norm.{p}"] = state.pop(f"ln_final.{p}")
        for i in range(layers):
            src, dst = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
            for q, kv in zip("qkv", state.pop(f"{src}attn.in_proj_{p}").chunk(3)):
                out[f"{dst}self_attn.{q}_proj.{p}"] = kv
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{theirs}.{p}"] = state.pop(f"{src}{ours}.{p}")
    state.pop("text_projection", None)  # after the pooled token only: the per-token features never use it
    if state:
        raise DiffusersConversionError(f"the open_clip text tower has parts CLIPTextModel lacks: {sorted(state)[:8]}")
    return out


def hf_to_open_clip(state: dict, layers: int, prefix: str) -> dict:
    out = {"token_embedding.weight": state[f"{prefix}embeddings.token_embedding.weight"],
           "positional_embedding": state[f"{prefix}embeddings.position_embedding.weight"]}
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = state[f"{prefix}final_layer_norm.{p}"]
        for i in range(layers):
            dst, src = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([state[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{ours}.{p}"] = state[f"{src}{theirs}.{p}"]
    return out


def text_to_diffusers(encoder: CLIPTextEncoder):
    """(CLIPTextModel whose last hidden state equals `encoder.token_features`, CLIPTokenizer giving our ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if not encoder.normalize:
        raise DiffusersConversionError("the text encoder does not L2-normalise its features (text.normalize: "
                                       "false); diffusers' VQDiffusionPipeline always does. Train with "
                                       "text.normalize: true and a text.feature_scale instead")
    if encoder.backend is TextBackend.HF:
        model, tokenizer = copy.deepcopy(encoder.tower).float(), copy.deepcopy(encoder.tokenizer)
        tokenizer.model_max_length = encoder.context_length
        if not pads_like_vqdiff(model, tokenizer.pad_token_id):
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            pad_like_vqdiff(model, tokenizer.pad_token_id)
        return model.eval(), tokenizer
    tower = encoder.tower
    block = tower.transformer.resblocks[0]
    activation = CLIP_ACTIVATIONS.get(type(block.mlp.gelu).__name__)
    if activation is None or getattr(block.mlp.gelu, "approximate", "none") != "none":
        raise DiffusersConversionError(f"the text tower's MLP activation {block.mlp.gelu} has no CLIPTextModel "
                                       "hidden_act (gelu or quick_gelu)")
    if not isinstance(block.attn, nn.MultiheadAttention) or tower.attn_mask is None:
        raise DiffusersConversionError("the text tower is not a causal nn.MultiheadAttention CLIP transformer")
    if block.ln_1.eps != tower.ln_final.eps:
        raise DiffusersConversionError("the text tower's layer norms use different eps; CLIPTextModel has one")
    layers, width = len(tower.transformer.resblocks), tower.transformer.width
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads, max_position_embeddings=encoder.context_length,
        hidden_act=activation, layer_norm_eps=block.ln_1.eps, projection_dim=width, pad_token_id=PAD_ID,
        bos_token_id=encoder.tokenizer.sot_token_id, eos_token_id=encoder.tokenizer.eot_token_id)
    model = CLIPTextModel(config)
    state = {k: v.float() for k, v in tower.state_dict().items()}
    state["positional_embedding"] = state["positional_embedding"][:encoder.context_length]
    load_exactly(model, open_clip_to_hf(state, layers, hf_prefix(model)), "the text tower in CLIPTextModel")
    vocab, merges = clip_vocabulary(encoder.tokenizer)
    vocab[PAD_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD_TOKEN,
                              model_max_length=encoder.context_length)
    pad_like_vqdiff(model, tokenizer.pad_token_id)
    return model.eval(), tokenizer


def pads_like_vqdiff(model, pad_id: int | None) -> bool:
    """Whether the pad token's embedding is that of id 0, so its features are the ones vqdiff's padding gives."""
    weight = model.get_input_embeddings().weight
    return pad_id is not None and pad_id < len(weight) and torch.equal(weight[pad_id], weight[PAD_ID])


def pad_like_vqdiff(model, pad_id: int) -> None:
    """vqdiff pads with id 0 ("!"); the tokenizer's own pad token gets a copy of that embedding."""
    if pad_id != model.config.vocab_size:
        raise DiffusersConversionError(f"the pad token got id {pad_id}, expected {model.config.vocab_size}")
    model.resize_token_embeddings(pad_id + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[pad_id] = model.get_input_embeddings().weight[PAD_ID]


def text_from_diffusers(model, tokenizer) -> tuple[CLIPTextEncoder, str]:
    """(CLIPTextEncoder with open_clip names and CLIP's BPE, its arch) for a CLIPTextModel + CLIPTokenizer."""
    c = model.config
    size = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
    arch = sized_text_arch(*size) if c.hidden_act == "quick_gelu" else GELU_TEXT_TOWERS.get(size)
    if arch is None or c.hidden_act not in CLIP_ACTIVATIONS.values() or c.intermediate_size != 4 * c.hidden_size \
            or c.layer_norm_eps != 1e-5:
        raise DiffusersConversionError(
            f"no open_clip text tower has this CLIPTextModel's layout (width {c.hidden_size}, {c.num_hidden_layers} "
            f"layers, {c.num_attention_heads} heads, {c.hidden_act}, MLP {c.intermediate_size}, eps "
            f"{c.layer_norm_eps}); vqdiff has any size with quick_gelu, MLP 4x and eps 1e-5, and erf-GELU towers "
            f"{sorted(GELU_TEXT_TOWERS.values())}")
    state, prefix = model.state_dict(), hf_prefix(model)
    embedding = state[f"{prefix}embeddings.token_embedding.weight"]
    if not pads_like_vqdiff(model, tokenizer.pad_token_id):
        raise DiffusersConversionError(f"the tokenizer pads with {tokenizer.pad_token!r} (id "
                                       f"{tokenizer.pad_token_id}), whose embedding is not that of id {PAD_ID}; "
                                       f"vqdiff pads with id {PAD_ID}")
    state[f"{prefix}embeddings.token_embedding.weight"] = embedding[:CLIP_VOCAB_SIZE]  # extra rows: pads
    tower = hf_to_open_clip(state, c.num_hidden_layers, prefix)
    if arch not in CUSTOM_TEXT_TOWERS:  # after the pooled token only, so CLIPTextModel drops it
        tower["text_projection"] = torch.zeros(c.hidden_size, c.hidden_size)
    try:
        encoder = CLIPTextEncoder(arch=arch, weights=tower, context_length=c.max_position_embeddings)
    except ValueError as error:
        raise DiffusersConversionError(f"the CLIPTextModel does not fit open_clip {arch}: {error}") from error
    vocab, _ = clip_vocabulary(encoder.tokenizer)
    theirs = tokenizer.get_vocab()
    if any(theirs.get(token) != i for token, i in vocab.items()):
        raise DiffusersConversionError("the tokenizer's vocabulary is not CLIP's BPE vocabulary (open_clip "
                                       "bpe_simple_vocab_16e6), the only one vqdiff's text encoder has")
    return encoder.eval(), arch


# ---- whole pipelines ------------------------------------------------------------------------------

def export_pipeline(cfg: ExperimentConfig, tokenizer: GumbelVQVAE, network: DiffusionTransformer,
                    text_encoder: CLIPTextEncoder, out_dir, ignore_padding_mask: bool = False) -> Path:
    """Write a folder that `diffusers.VQDiffusionPipeline.from_pretrained(out_dir)` loads (replaced atomically)."""
    diffusers = require_diffusers()
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    schedule = cfg.discrete.schedule
    if schedule not in MASK_AND_REPLACE_PRESETS:
        raise DiffusersConversionError(f"schedule {schedule!r} is not a preset ({sorted(MASK_AND_REPLACE_PRESETS)})")
    alpha_start, alpha_end, gamma_start, gamma_end = MASK_AND_REPLACE_PRESETS[schedule]
    transformer = transformer_to_diffusers(network, ignore_padding_mask, text_encoder.feature_scale)
    vqvae, extras = codec_to_diffusers(tokenizer)
    text_model, clip_tokenizer = text_to_diffusers(text_encoder)
    null = network.empty_text_embed
    embeddings = LearnedClassifierFreeSamplingEmbeddings(
        learnable=null is not None, hidden_size=None if null is None else null.shape[1],
        length=None if null is None else null.shape[0])
    if null is not None:
        # it replaces the features after the scale, which the exported cross-attention now applies
        load_exactly(embeddings, {"embeddings": null.detach().float() / text_encoder.feature_scale},
                     "the null text embedding")
    scheduler = diffusers.VQDiffusionScheduler(
        num_vec_classes=network.num_classes + 1, num_train_timesteps=cfg.discrete.num_timesteps,
        alpha_cum_start=alpha_start, alpha_cum_end=alpha_end, gamma_cum_start=gamma_start, gamma_cum_end=gamma_end)
    pipe = diffusers.VQDiffusionPipeline(vqvae=vqvae, text_encoder=text_model, tokenizer=clip_tokenizer,
                                         transformer=transformer, scheduler=scheduler,
                                         learned_classifier_free_sampling_embeddings=embeddings)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_file(extras, tmp / "vqvae" / GUMBEL_FILE, metadata={"config": json.dumps(tokenizer.config)})
    write_bpe_files(tmp / "tokenizer")
    declare_cf_module(tmp / "model_index.json", type(embeddings).__module__)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def import_pipeline(directory) -> tuple[ExperimentConfig, GumbelVQVAE, DiffusionTransformer, CLIPTextEncoder]:
    """(config, tokenizer, transformer, text encoder) of a VQDiffusionPipeline folder, read offline."""
    parts = read_parts(Path(directory))
    text_encoder, arch = text_from_diffusers(parts["text_encoder"], parts["tokenizer"])
    network = transformer_from_diffusers(parts["transformer"], parts["null_text"], text_encoder.context_length)
    vqvae = parts["vqvae"]
    side, levels = network.grid_size[0], len(vqvae.config.block_out_channels)
    extras, config = read_gumbel_extras(Path(directory) / "vqvae" / GUMBEL_FILE)
    tokenizer = codec_from_diffusers(vqvae, extras, config, side * 2 ** (levels - 1))
    schedule = scheduler_preset(parts["scheduler"].config, network.num_classes, network.blocks[0].ln1.num_steps)
    if tokenizer.num_embeddings != network.num_classes:
        raise DiffusersConversionError(f"the VQModel has {tokenizer.num_embeddings} codes but the transformer "
                                       f"predicts {network.num_classes} classes")
    cfg = ExperimentConfig(name=Path(directory).name, model=ModelType.VQ_DIFFUSION, network=Network.TRANSFORMER)
    cfg.data.size = side * tokenizer.downsample_factor
    tc = tokenizer.config
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embedding_dim",
                "num_embeddings", "norm_groups"):
        setattr(cfg.tokenizer, key, tc[key])
    cfg.text = TextEncoderConfig(backend="open_clip", arch=arch, weights="none",
                                 context_length=text_encoder.context_length, normalize=True, trainable=False)
    block = network.blocks[0]
    cfg.transformer = TransformerConfig(
        num_layers=len(network.blocks), width=network.content_emb.emb.weight.shape[1], num_heads=block.attn1.num_heads,
        time_embedding="table", mlp_activation=mlp_activation(network),
        mlp_ratio=4.0, mask_text_padding=False, null_text_embedding=parts["null_text"] is not None,
        text_drop_prob=0.1 if parts["null_text"] is not None else 0.0, dropout=parts["transformer"].config.dropout)
    cfg.discrete.num_timesteps, cfg.discrete.schedule = block.ln1.num_steps, schedule
    return cfg, tokenizer, network, text_encoder


def read_parts(directory: Path) -> dict:
    """Each part of a VQDiffusionPipeline folder, loaded by its own class (offline): diffusers 0.42 cannot resolve
    the null-text part that older releases declared as ["vq_diffusion", ...] in model_index.json."""
    diffusers = require_diffusers()
    from diffusers.pipelines.deprecated.vq_diffusion import LearnedClassifierFreeSamplingEmbeddings
    from transformers import CLIPTextModel, CLIPTokenizer
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(f"{directory} is not a diffusers pipeline folder (no model_index.json)")
    parts = dict(
        transformer=diffusers.Transformer2DModel.from_pretrained(directory, subfolder="transformer",
                                                                 local_files_only=True),
        vqvae=diffusers.VQModel.from_pretrained(directory, subfolder="vqvae", local_files_only=True),
        scheduler=diffusers.VQDiffusionScheduler.from_pretrained(directory, subfolder="scheduler",
                                                                 local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(directory / "text_encoder", local_files_only=True).float(),
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True), null_text=None)
    if (directory / CF_FOLDER).is_dir():
        cf = LearnedClassifierFreeSamplingEmbeddings.from_pretrained(directory, subfolder=CF_FOLDER,
                                                                     local_files_only=True)
        parts["null_text"] = cf.embeddings.detach().float() if cf.learnable else None
    else:
        log.warning("%s has no %s/: classifier-free guidance will use the encoded empty prompt", directory, CF_FOLDER)
    return parts


def declare_cf_module(model_index: Path, module: str) -> None:
    """diffusers 0.42 saves the null-text part as ["diffusers", ...] but cannot load it from there (the class moved
    to pipelines.deprecated); its full module path resolves, as VQDiffusionPipeline has imported that module."""
    index = json.loads(model_index.read_text())
    index[CF_FOLDER] = [module, index[CF_FOLDER][1]]
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_bpe_files(directory: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for transformers versions whose CLIPTokenizer reads those."""
    model = json.loads((directory / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def read_gumbel_extras(path: Path) -> tuple[dict | None, dict | None]:
    if not path.is_file():
        log.info("%s is absent: the VQModel's nearest-neighbour encoder becomes GumbelVQVAE code logits", path.name)
        return None, None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])


def scheduler_preset(config, num_classes: int, num_steps: int) -> str:
    """The name of our mask-and-replace preset with the scheduler's cumulative start and end values."""
    if config.num_vec_classes != num_classes + 1 or config.num_train_timesteps != num_steps:
        raise DiffusersConversionError(
            f"the scheduler is for {config.num_vec_classes} classes and {config.num_train_timesteps} steps; the "
            f"transformer has {num_classes} + 1 and {num_steps}")
    values = (config.alpha_cum_start, config.alpha_cum_end, config.gamma_cum_start, config.gamma_cum_end)
    for name, preset in MASK_AND_REPLACE_PRESETS.items():
        if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(values, preset)):
            return name
    raise DiffusersConversionError(f"the scheduler's (alpha_cum_start, alpha_cum_end, gamma_cum_start, "
                                   f"gamma_cum_end) = {values} match no vqdiff schedule preset "
                                   f"{MASK_AND_REPLACE_PRESETS}")
