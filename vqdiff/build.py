"""The one place that turns a config into objects: data sets, networks, diffusion processes, tokenizers.

Every function returns what it builds and leaves the config as it was. Training tasks, previews and
evaluators are built in train/tasks.py, pipelines in pipelines/.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, DiffusionSpace, ExperimentConfig, ModelType, Network
from .data.captions import CocoCaptions, caption_folder
from .data.images import CIFAR10, MNIST, ImageFolder
from .data.shapes import ShapesDataset
from .data.tokens import TokenDataset, dataset_fingerprint
from .data.toy2d import Toy2D
from .diffusion.discrete import MaskAndReplaceDiffusion
from .diffusion.gaussian import GaussianDiffusion, LossType, MeanType, VarType
from .diffusion.schedules import beta_schedule
from .diffusion.timestep_sampler import ImportanceSampler, UniformSampler
from .io.tokenizer import load_tokenizer
from .models.conditioned import TextConditioned
from .models.gumbel import SplitGumbelQuantizer
from .models.mlp import MLPDenoiser
from .models.transformer import TRANSFORMER_PRESETS, DiffusionTransformer
from .models.transformer import parameter_counts as transformer_counts
from .models.unet import UNet
from .models.vqvae import GumbelVQVAE
from .options import TimeSampler

IMAGE_DATA = ("cifar10", "mnist", "image_folder", "shapes")
VECTOR_DATA = ("toy2d",)
CAPTION_DATA = ("captions", "coco")


# ---- data ------------------------------------------------------------------------------------------

def data_shape(cfg: ExperimentConfig, tokenizer=None) -> tuple[int, ...]:
    """Shape of one diffused example: (C, H, W) for images, (2,) for toy points, (D, h, w) for latents (from the
    tokenizer, else from cfg.vqvae's architecture)."""
    name = cfg.data.name
    if cfg.model is ModelType.DDPM and cfg.gaussian.space is DiffusionSpace.LATENT:
        dim = tokenizer.config["embedding_dim"] if tokenizer is not None else cfg.vqvae.embedding_dim
        return (dim, *token_grid(cfg, tokenizer))
    if name in VECTOR_DATA:
        return (2,)
    if name == "mnist":
        return (1, cfg.data.size, cfg.data.size)
    if name in IMAGE_DATA:
        return (3, cfg.data.size, cfg.data.size)
    raise ConfigError(f"data.name: unknown data set '{name}'; choose one of {IMAGE_DATA + VECTOR_DATA}")


def build_dataset(cfg: ExperimentConfig, split: str = "train"):
    d = cfg.data
    train = split == "train"
    if d.name == "toy2d":
        return Toy2D(d.toy, num_samples=d.num_samples, seed=d.seed if train else d.seed + 1)
    if d.name == "shapes":
        augment = d.extent_range is not None or d.shift > 0 or d.flip
        if augment and cfg.model is not ModelType.VQVAE:
            raise ConfigError("data.extent_range / data.shift / data.flip: tokenizer training only (model: vqvae); "
                              "they change sizes and places that the captions name")
        return ShapesDataset(split=split, size=d.size, num_samples=d.num_samples, seed=d.seed,
                             max_objects=d.max_objects, paraphrase=d.paraphrase and train,
                             extent_range=d.extent_range if train else None, shift=d.shift if train else 0.0,
                             flip=d.flip and train)
    if d.root is None:
        raise ConfigError(f"data.root: the '{d.name}' data set needs a local folder (data.root=PATH)")
    if d.name == "cifar10":
        return CIFAR10(d.root, train=train, classes=d.classes, flip=d.hflip and train)
    if d.name == "mnist":
        return MNIST(d.root, train=train, classes=d.classes, pad_to=d.size if d.size != 28 else None,
                     flip=d.hflip and train)
    if d.name == "image_folder":
        return ImageFolder(d.root, size=d.size)
    raise ConfigError(f"data.name: unknown data set '{d.name}'; choose one of {IMAGE_DATA + VECTOR_DATA}")


def build_caption_dataset(cfg: ExperimentConfig, split: str = "train"):
    """data.name "captions": data.root (or data.root/<split> when it exists) holding metadata.jsonl or image +
    same-name .txt files; "coco": data.root with annotations/captions_<split>2017.json and <split>2017/."""
    d = cfg.data
    if d.root is None:
        raise ConfigError(f"data.root: the '{d.name}' data set needs a local folder (data.root=PATH)")
    root = Path(d.root)
    if d.name == "coco":
        return CocoCaptions(root / f"{split}2017", root / "annotations" / f"captions_{split}2017.json", d.size, d.seed)
    if d.name == "captions":
        if (root / split).is_dir():
            return caption_folder(root / split, d.size, d.seed)
        if split != "train":
            raise ConfigError(f"data.root: {root} has no {split}/ folder for the {split!r} split")
        return caption_folder(root, d.size, d.seed)
    raise ConfigError(f"data.name: '{d.name}' is not a captioned data set; choose one of {CAPTION_DATA}")


def build_tokenizer_data(cfg: ExperimentConfig, split: str = "train"):
    """The images a tokenizer trains on or encodes: caption data sets here, the others via build_dataset."""
    if cfg.data.name in CAPTION_DATA:
        return build_caption_dataset(cfg, split)
    return build_dataset(cfg, split)


def build_vq_dataset(cfg: ExperimentConfig, split: str = "train"):
    """The token cache when data.tokens is set (no image encoder per step), else the image data set."""
    if cfg.data.tokens is None:
        return build_tokenizer_data(cfg, split)
    # refuse a cache made from other data or by another tokenizer than the config names
    return TokenDataset(cfg.data.tokens, expect_fingerprint=dataset_fingerprint(build_tokenizer_data(cfg, split)),
                        expect_tokenizer=cfg.tokenizer.path, seed=cfg.data.seed)


def build_train_dataset(cfg: ExperimentConfig):
    """What the trainer iterates: VQ-Diffusion and a latent DDPM read the token cache when data.tokens is set."""
    latent_ddpm = cfg.model is ModelType.DDPM and cfg.gaussian.space is DiffusionSpace.LATENT
    if cfg.model is ModelType.VQ_DIFFUSION or latent_ddpm:
        return build_vq_dataset(cfg)
    return build_dataset(cfg)


# ---- tokenizers ------------------------------------------------------------------------------------

def build_tokenizer(cfg: ExperimentConfig) -> GumbelVQVAE:
    """A new (untrained) GumbelVQVAE from cfg.vqvae's architecture, for images of cfg.data.size."""
    t = cfg.vqvae
    return GumbelVQVAE(resolution=cfg.data.size, ch=t.ch, ch_mult=t.ch_mult, num_res_blocks=t.num_res_blocks,
                       attn_resolutions=t.attn_resolutions, z_channels=t.z_channels, dropout=t.dropout,
                       norm_groups=t.norm_groups, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                       straight_through=t.straight_through, kl_weight=t.kl_weight, temperature=t.temperature_start,
                       encoder=t.encoder.value, decoder=t.decoder.value, factors=t.factors)


def load_configured_tokenizer(cfg: ExperimentConfig):
    """The trained tokenizer at cfg.tokenizer.path (a directory written by train_vqvae / save_tokenizer)."""
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: this model needs a trained tokenizer directory "
                          "(train one with scripts/train_vqvae.py; it writes <run>/tokenizer)")
    return load_tokenizer(cfg.tokenizer.path)


def uses_tokenizer(cfg: ExperimentConfig) -> bool:
    """Whether the model works on a trained tokenizer's codes or latents (VQ-Diffusion, latent DDPM)."""
    return cfg.model is ModelType.VQ_DIFFUSION or (cfg.model is ModelType.DDPM
                                                   and cfg.gaussian.space is DiffusionSpace.LATENT)


def token_grid(cfg: ExperimentConfig, tokenizer=None) -> tuple[int, int]:
    """(h, w) of the token grid: data.size over the tokenizer's downsampling, or, without a tokenizer (before it
    is trained), over the one cfg.vqvae.ch_mult gives."""
    factor = tokenizer.downsample_factor if tokenizer is not None else 2 ** (len(cfg.vqvae.ch_mult) - 1)
    side = cfg.data.size // factor
    return (side, side)


# ---- diffusion -------------------------------------------------------------------------------------

def build_time_sampler(name: TimeSampler, num_timesteps: int, ema_decay: float | None = None):
    """ema_decay: the importance sampler's moving average of L_t^2 (VQ-Diffusion: 0.9); None keeps
    improved-diffusion's mean over the last 10 losses."""
    if TimeSampler(name) is TimeSampler.IMPORTANCE:
        return ImportanceSampler(num_timesteps, ema_decay=ema_decay)
    return UniformSampler(num_timesteps)


def build_gaussian_diffusion(cfg: ExperimentConfig) -> GaussianDiffusion:
    g = cfg.gaussian
    betas = beta_schedule(g.beta_schedule, g.num_timesteps, g.beta_start, g.beta_end)
    pixels = cfg.data.name in IMAGE_DATA and g.space is DiffusionSpace.PIXEL
    return GaussianDiffusion(betas, mean_type=MeanType(g.mean_type), var_type=VarType(g.var_type),
                             loss_type=LossType(g.loss_type), discrete_data=pixels)


def build_discrete_diffusion(cfg: ExperimentConfig, num_classes: int) -> MaskAndReplaceDiffusion:
    d = cfg.discrete
    return MaskAndReplaceDiffusion(num_classes, d.num_timesteps, schedule=d.schedule, aux_weight=d.aux_weight,
                                   adaptive_aux_weight=d.adaptive_aux_weight, mask_weight=tuple(d.mask_weight))


# ---- networks --------------------------------------------------------------------------------------

def is_text_ddpm(cfg: ExperimentConfig) -> bool:
    return cfg.model is ModelType.DDPM and (cfg.unet.text or cfg.gaussian.space is DiffusionSpace.LATENT)


def null_text_std(cfg: ExperimentConfig, text_dim: int) -> float:
    """Per-element scale of the text features, where a learned null caption starts: feature_scale / sqrt(width)
    for L2-normalised features, 1 for un-normalised ones (layer-norm outputs)."""
    return cfg.text.feature_scale * (text_dim ** -0.5 if cfg.text.normalize else 1.0)


def build_text_encoder(cfg: ExperimentConfig):
    from .models.text import CLIPTextEncoder  # imports open_clip: only models that read text pay for it
    t = cfg.text
    return CLIPTextEncoder(backend=t.backend, arch=t.arch, weights=t.weights, context_length=t.context_length,
                           normalize=t.normalize, feature_scale=t.feature_scale, trainable=t.trainable)


def build_network(cfg: ExperimentConfig, shape: tuple[int, ...] | None = None,
                  context_dim: int | None = None) -> nn.Module:
    """The Gaussian denoising network alone; `shape` defaults to data_shape(cfg), `context_dim` is the text
    feature width."""
    if cfg.model is not ModelType.DDPM or cfg.network not in (Network.MLP, Network.UNET):
        raise ConfigError(f"network: {cfg.network.value!r} does not go with model: {cfg.model.value!r}")
    learn_sigma = VarType(cfg.gaussian.var_type) in (VarType.LEARNED, VarType.LEARNED_RANGE)
    shape = shape or data_shape(cfg)
    if cfg.network is Network.MLP:
        if len(shape) != 1:
            raise ConfigError("network: mlp needs vector data (data.name=toy2d); use unet for images")
        return MLPDenoiser(data_dim=shape[0], hidden=cfg.mlp.hidden, num_layers=cfg.mlp.num_layers,
                           out_dim=shape[0] * (2 if learn_sigma else 1))
    if len(shape) != 3:
        raise ConfigError("network: unet needs image data; use mlp for data.name=toy2d")
    u = cfg.unet
    text = dict(context_dim=context_dim, text_length=cfg.text.context_length, text_drop_prob=u.text_drop_prob,
                null_text_std=null_text_std(cfg, context_dim)) if u.text else {}
    return UNet(in_channels=shape[0], out_channels=shape[0], ch=u.ch, ch_mult=tuple(u.ch_mult),
                attn_resolutions=tuple(u.attn_resolutions), num_res_blocks=u.num_res_blocks,
                dropout=u.dropout, image_size=shape[1], learn_sigma=learn_sigma,
                num_classes=u.num_classes, num_heads=u.num_heads, resblock_updown=u.resblock_updown,
                use_scale_shift_norm=u.use_scale_shift_norm, grad_checkpointing=u.grad_checkpointing,
                position_embedding=u.position_embedding, **text)


def build_ddpm_model(cfg: ExperimentConfig, tokenizer=None) -> nn.Module:
    """The trained part of a Gaussian model: the network, with its text encoder (a TextConditioned) when
    unet.text; `tokenizer` gives the latent shape in latent space."""
    shape = data_shape(cfg, tokenizer)
    if not cfg.unet.text:
        return build_network(cfg, shape)
    text_encoder = build_text_encoder(cfg)
    return TextConditioned(build_network(cfg, shape, text_encoder.dim), text_encoder)


def transformer_kwargs(cfg: ExperimentConfig) -> dict:
    tc = cfg.transformer
    size = dict(num_layers=tc.num_layers, width=tc.width, num_heads=tc.num_heads)
    if tc.preset is not None:
        size = dict(TRANSFORMER_PRESETS[tc.preset])
    return dict(size, num_steps=cfg.discrete.num_timesteps, time_embedding=tc.time_embedding,
                mlp_activation=tc.mlp_activation, mlp_ratio=tc.mlp_ratio, mask_text_padding=tc.mask_text_padding,
                null_text_embedding=tc.null_text_embedding, text_drop_prob=tc.text_drop_prob, dropout=tc.dropout,
                gradient_checkpointing=tc.gradient_checkpointing, qk_init_std=tc.qk_init_std)


def token_factors(tokenizer) -> tuple[int, int] | None:
    """A layered tokenizer's [outline, colour] codebook factors when all its codes are kept, else None: the
    transformer then embeds and predicts the two parts of a token apart (FactoredContentEmbedding)."""
    quantize = getattr(tokenizer, "quantize", None)  # a PatchVQGAN has none
    if not isinstance(quantize, SplitGumbelQuantizer) or tokenizer.num_embeddings != tokenizer.codebook_size:
        return None
    return quantize.factors


def build_vq_model(cfg: ExperimentConfig, num_classes: int, grid_size: tuple[int, int],
                   factors: tuple[int, int] | None = None) -> TextConditioned:
    """The trained part of a text-to-image model: DiffusionTransformer + its text encoder."""
    text_encoder = build_text_encoder(cfg)
    transformer = DiffusionTransformer(num_classes=num_classes, grid_size=grid_size, text_dim=text_encoder.dim,
                                       text_length=cfg.text.context_length,
                                       null_text_std=null_text_std(cfg, text_encoder.dim),
                                       factors=factors, **transformer_kwargs(cfg))
    return TextConditioned(transformer, text_encoder)


def build_model_and_diffusion(cfg: ExperimentConfig, tokenizer=None) -> tuple[nn.Module, object]:
    """A model's trained part (the network, with its text encoder for text-to-image) and its diffusion process.

    `tokenizer` is the trained tokenizer of VQ-Diffusion (its K and token grid) and of a latent DDPM (the
    latent shape); other models take none."""
    if cfg.model is ModelType.VQ_DIFFUSION:
        if tokenizer is None:
            raise ConfigError("a VQ-Diffusion model is built on its trained tokenizer (tokenizer.path)")
        num_classes = tokenizer.num_embeddings
        return (build_vq_model(cfg, num_classes, token_grid(cfg, tokenizer), token_factors(tokenizer)),
                build_discrete_diffusion(cfg, num_classes))
    if cfg.model is ModelType.DDPM:
        return build_ddpm_model(cfg, tokenizer), build_gaussian_diffusion(cfg)
    raise ConfigError(f"model: {cfg.model.value!r} is a tokenizer (build_tokenizer), not a diffusion model")


# ---- parameter counts ------------------------------------------------------------------------------

def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: ExperimentConfig, num_classes: int | None = None) -> dict[str, int]:
    """Parameters per part of a config's networks, built on the meta device (instant, no memory).

    For VQ-Diffusion, K comes from `num_classes`, else the tokenizer at tokenizer.path, else
    vqvae.num_embeddings; the grid is data.size over the tokenizer's downsampling."""
    if (cfg.model is ModelType.VQ_DIFFUSION or is_text_ddpm(cfg)) and cfg.text.backend == "open_clip":
        cfg = copy.deepcopy(cfg)
        cfg.text.weights = "none"  # counting needs the architecture only, not the local weights file
    # a trained tokenizer holds real weights: loaded on the CPU, outside the meta device
    has_tokenizer = uses_tokenizer(cfg) and cfg.tokenizer.path is not None and Path(cfg.tokenizer.path).exists()
    tokenizer = load_configured_tokenizer(cfg) if has_tokenizer else None
    with torch.device("meta"):
        if cfg.model is ModelType.VQ_DIFFUSION:
            if tokenizer is not None:
                num_classes = num_classes or tokenizer.num_embeddings
            model = build_vq_model(cfg, num_classes or cfg.vqvae.num_embeddings, token_grid(cfg, tokenizer),
                                   None if tokenizer is None else token_factors(tokenizer))
            counts = {f"transformer.{k}": v for k, v in transformer_counts(model.network).items()}
            counts["text_encoder"] = count_parameters(model.text_encoder)
            return counts
        if cfg.model is ModelType.VQVAE:
            return {"tokenizer": count_parameters(build_tokenizer(cfg))}
        if is_text_ddpm(cfg):
            model = build_ddpm_model(cfg, tokenizer)
            return {cfg.network.value: count_parameters(model.network),
                    "text_encoder": count_parameters(model.text_encoder)}
        return {cfg.network.value: count_parameters(build_network(cfg))}
