"""Our tokenizers <-> diffusers VQModel. PatchVQGAN (ITHQ's, nearest-neighbour codebook) is a VQModel with other
names. GumbelVQVAE keeps its decoder and codebook there; VQModel has no Gumbel code logits, so the export also writes
the tensors it lacks to `vqvae/vqdiff_gumbel.safetensors`, which bring our encoder back on import."""

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ...models.patch_vqgan import PatchVQGAN
from ...models.vqvae import GumbelVQVAE, ImageCodec
from .common import DiffusersConversionError, load_exactly, rename, require_diffusers

log = logging.getLogger(__name__)

GUMBEL_FILE = "vqdiff_gumbel.safetensors"  # beside vqvae/diffusion_pytorch_model.safetensors


def vq_rules(levels: int) -> list:
    """Our tokenizers' taming names -> VQModel; the decoder's up.i runs (levels - 1 - i)-th in diffusers."""
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


def shared_vq_keys(tokenizer: ImageCodec) -> dict[str, str]:
    """Our encoder/decoder/post_quant_conv keys -> VQModel keys (quant_conv and the quantizer differ)."""
    rules = vq_rules(len(tokenizer.config["ch_mult"]))
    return {k: rename(k, rules) for k in tokenizer.state_dict() if k.startswith(("encoder.", "decoder.", "post_"))}


def attention_levels(tokenizer: ImageCodec) -> list[bool]:
    return [len(level.attn) > 0 for level in tokenizer.encoder.down]


def codec_to_diffusers(tokenizer: ImageCodec):
    """(VQModel decoding our token ids like `tokenizer.decode`, the tensors VQModel lacks for our encoder or None).
    A PatchVQGAN needs none: VQModel's nearest-neighbour encoder is its own."""
    diffusers = require_diffusers()
    c = tokenizer.config
    kinds = {c.get("encoder", "taming"), c.get("decoder", "taming")} - {"taming"}
    if kinds or c.get("factors"):
        raise DiffusersConversionError(f"a {'/'.join(sorted(kinds)) or 'product-codebook'} tokenizer has no "
                                       "diffusers VQModel counterpart; only taming encoders and decoders convert")
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
    nearest = isinstance(tokenizer, PatchVQGAN)
    state["quantize.embedding.weight"] = (ours["quantize.embedding"] if nearest
                                          else tokenizer.quantize.codebook(tokenizer.code_map))
    if nearest or c["z_channels"] == c["embedding_dim"]:
        state.update({f"quant_conv.{p}": ours[f"quant_conv.{p}"] for p in ("weight", "bias")})
    else:  # VQModel's quant_conv maps to the codebook width; ours keeps z_channels and feeds the code logits
        log.warning("z_channels %d != embedding_dim %d: VQModel.encode gets a zero quant_conv (it cannot hold ours); "
                    "decoding is exact", c["z_channels"], c["embedding_dim"])
        state.update({f"quant_conv.{p}": torch.zeros_like(theirs[f"quant_conv.{p}"]) for p in ("weight", "bias")})
    load_exactly(model, state, f"the {type(tokenizer).__name__} in VQModel")
    if nearest:
        return model.eval(), None
    extras = {k: v.contiguous() for k, v in ours.items()
              if k.startswith(("quant_conv.", "quantize.")) or k == "code_map"}
    return model.eval(), extras


def codec_from_diffusers(model, extras: dict | None, config: dict | None, resolution: int) -> ImageCodec:
    """With `extras`/`config` from our export, our GumbelVQVAE again; otherwise (e.g. ITHQ's VQModel) a PatchVQGAN,
    whose nearest-neighbour encoder is VQModel's."""
    theirs = model.state_dict()
    codebook = theirs["quantize.embedding.weight"]  # [K', D]
    if extras is None:
        tokenizer = PatchVQGAN.from_config(generic_codec_config(model.config, resolution))
    else:
        tokenizer = GumbelVQVAE.from_config(config)
    own = tokenizer.state_dict()  # attention projections: 1x1 convolutions here, linear layers there
    state = {key: theirs[name].reshape(own[key].shape) for key, name in shared_vq_keys(tokenizer).items()}
    if extras is None:
        state.update({f"quant_conv.{p}": theirs[f"quant_conv.{p}"] for p in ("weight", "bias")})
        state["quantize.embedding"] = codebook
    else:
        state.update(extras)
        full = extras["quantize.embed.weight"].clone()
        full[extras.get("code_map", slice(None))] = codebook  # VQModel's rows are the ones diffusers decodes with
        state["quantize.embed.weight"] = full
    load_exactly(tokenizer, state, f"the VQModel in {type(tokenizer).__name__}")
    return tokenizer.eval()


def generic_codec_config(c, resolution: int) -> dict:
    """A PatchVQGAN config with the layout of a VQModel config, or an error naming what does not fit."""
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
        raise DiffusersConversionError("this VQModel has no vqdiff tokenizer equivalent (PatchVQGAN, taming "
                                       "layout): " + "; ".join(problems))
    levels = len(c.block_out_channels)
    return dict(
        resolution=resolution, in_channels=c.in_channels, out_channels=c.out_channels, ch=ch,
        ch_mult=[w // ch for w in c.block_out_channels], num_res_blocks=c.layers_per_block,
        attn_resolutions=[resolution // 2 ** i for i in range(levels) if attn[i]], z_channels=c.latent_channels,
        dropout=0.0, norm_groups=c.norm_num_groups, embedding_dim=c.vq_embed_dim or c.latent_channels,
        num_embeddings=c.num_vq_embeddings)


def read_gumbel_extras(path: Path) -> tuple[dict | None, dict | None]:
    if not path.is_file():
        log.info("%s is absent: the VQModel becomes a PatchVQGAN (nearest-neighbour codebook)", path.name)
        return None, None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])
