"""Whole VQDiffusionPipeline folders: export a vqdiff model into one (atomically), import one as vqdiff parts."""

import json
import logging
import math
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ...config import ExperimentConfig, ModelType, Network, TextEncoderConfig, TransformerConfig
from ...diffusion.schedules import MASK_AND_REPLACE_PRESETS
from ...models.text import CLIPTextEncoder
from ...models.transformer import DiffusionTransformer
from ...models.vqvae import ImageCodec
from .codec import GUMBEL_FILE, codec_from_diffusers, codec_to_diffusers, read_gumbel_extras
from .common import DiffusersConversionError, load_exactly, require_diffusers
from .text import text_from_diffusers, text_to_diffusers, write_bpe_files
from .transformer import mlp_activation, transformer_from_diffusers, transformer_to_diffusers

log = logging.getLogger(__name__)

CF_FOLDER = "learned_classifier_free_sampling_embeddings"


def export_pipeline(cfg: ExperimentConfig, tokenizer: ImageCodec, network: DiffusionTransformer,
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
    if extras is not None:  # a Gumbel encoder, which VQModel cannot hold
        save_file(extras, tmp / "vqvae" / GUMBEL_FILE, metadata={"config": json.dumps(tokenizer.config)})
    write_bpe_files(tmp / "tokenizer")
    declare_cf_module(tmp / "model_index.json", type(embeddings).__module__)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def import_pipeline(directory) -> tuple[ExperimentConfig, ImageCodec, DiffusionTransformer, CLIPTextEncoder]:
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
        setattr(cfg.vqvae, key, tc[key])
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
