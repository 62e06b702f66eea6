"""The one place that turns a config into objects: networks, diffusion processes, data sets, tasks."""

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, DiffusionSpace, ExperimentConfig, ModelType, Network
from .diffusion.gaussian import GaussianDiffusion, LossType, MeanType, VarType
from .diffusion.schedules import beta_schedule
from .diffusion.timestep_sampler import ImportanceSampler, UniformSampler
from .train.loop import TrainTask

log = logging.getLogger(__name__)
TIME_SAMPLERS = {"uniform": UniformSampler, "importance": ImportanceSampler}
IMAGE_DATA = ("cifar10", "mnist", "image_folder", "shapes")
VECTOR_DATA = ("toy2d",)


def data_shape(cfg: ExperimentConfig, tokenizer=None) -> tuple[int, ...]:
    """Shape of one diffused example: (C, H, W) for images, (2,) for toy points, (D, h, w) for latents (from the
    tokenizer, else from cfg.tokenizer's architecture)."""
    name = cfg.data.name
    if cfg.model is ModelType.DDPM and cfg.gaussian.space is DiffusionSpace.LATENT:
        dim = tokenizer.config["embedding_dim"] if tokenizer is not None else cfg.tokenizer.embedding_dim
        return (dim, *token_grid(cfg, tokenizer))
    if name in VECTOR_DATA:
        return (2,)
    if name == "mnist":
        return (1, cfg.data.size, cfg.data.size)
    if name in IMAGE_DATA:
        return (3, cfg.data.size, cfg.data.size)
    raise ConfigError(f"data.name: unknown data set {name!r}; choose one of {IMAGE_DATA + VECTOR_DATA}")


def build_dataset(cfg: ExperimentConfig, split: str = "train"):
    d = cfg.data
    train = split == "train"
    if d.name == "toy2d":
        from .data.toy2d import Toy2D
        return Toy2D(d.toy, num_samples=d.num_samples, seed=d.seed if train else d.seed + 1)
    if d.name == "shapes":
        from .data.shapes import ShapesDataset
        return ShapesDataset(split=split, size=d.size, num_samples=d.num_samples, seed=d.seed,
                             max_objects=d.max_objects, paraphrase=d.paraphrase and train)
    if d.root is None:
        raise ConfigError(f"data.root: the {d.name!r} data set needs a local folder (data.root=PATH)")
    if d.name == "cifar10":
        from .data.images import CIFAR10
        return CIFAR10(d.root, train=train, classes=d.classes, flip=d.hflip and train)
    if d.name == "mnist":
        from .data.images import MNIST
        return MNIST(d.root, train=train, classes=d.classes, pad_to=d.size if d.size != 28 else None,
                     flip=d.hflip and train)
    if d.name == "image_folder":
        from .data.images import ImageFolder
        return ImageFolder(d.root, size=d.size)
    raise ConfigError(f"data.name: unknown data set {d.name!r}; choose one of {IMAGE_DATA + VECTOR_DATA}")


def build_gaussian_diffusion(cfg: ExperimentConfig) -> GaussianDiffusion:
    g = cfg.gaussian
    betas = beta_schedule(g.beta_schedule, g.num_timesteps, g.beta_start, g.beta_end)
    pixels = cfg.data.name in IMAGE_DATA and g.space is DiffusionSpace.PIXEL
    return GaussianDiffusion(betas, mean_type=MeanType(g.mean_type), var_type=VarType(g.var_type),
                             loss_type=LossType(g.loss_type), discrete_data=pixels)


def build_network(cfg: ExperimentConfig, shape: tuple[int, ...] | None = None,
                  context_dim: int | None = None) -> nn.Module:
    """The denoising network alone; `shape` defaults to data_shape(cfg), `context_dim` is the text feature width."""
    if cfg.model is ModelType.DDPM:
        learn_sigma = VarType(cfg.gaussian.var_type) in (VarType.LEARNED, VarType.LEARNED_RANGE)
        shape = shape or data_shape(cfg)
        if cfg.network is Network.MLP:
            from .models.mlp import MLPDenoiser
            if len(shape) != 1:
                raise ConfigError("network: mlp needs vector data (data.name=toy2d); use unet for images")
            return MLPDenoiser(data_dim=shape[0], hidden=cfg.mlp.hidden, num_layers=cfg.mlp.num_layers,
                               out_dim=shape[0] * (2 if learn_sigma else 1))
        if cfg.network is Network.UNET:
            from .models.unet import UNet
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
                        **text)
    raise ConfigError(f"network: {cfg.network.value!r} does not go with model: {cfg.model.value!r}")


def build_time_sampler(name: str, num_timesteps: int, ema_decay: float | None = None):
    """ema_decay: the importance sampler's moving average of L_t^2 (VQ-Diffusion: 0.9); None keeps
    improved-diffusion's mean over the last 10 losses."""
    if name not in TIME_SAMPLERS:
        raise ConfigError(f"time_sampler: {name!r} is not one of {sorted(TIME_SAMPLERS)}")
    if name == "importance":
        return ImportanceSampler(num_timesteps, ema_decay=ema_decay)
    return UniformSampler(num_timesteps)


def ddpm_cond(cfg: ExperimentConfig, batch: dict) -> dict:
    """Network keyword arguments from a batch: class labels for class-conditional UNets."""
    if cfg.network is Network.UNET and cfg.unet.num_classes is not None:
        return {"y": batch["label"]}
    return {}


def build_ddpm_task(cfg: ExperimentConfig) -> TrainTask:
    if cfg.unet.text or cfg.gaussian.space is DiffusionSpace.LATENT:
        return build_text_ddpm_task(cfg)
    from .pipeline import ddpm_preview
    diffusion = build_gaussian_diffusion(cfg)
    model = build_network(cfg)
    data_key = "x" if cfg.data.name in VECTOR_DATA else "image"

    def losses(model, batch, t, generator):
        return diffusion.training_losses(model, batch[data_key], t, generator=generator, **ddpm_cond(cfg, batch))

    return TrainTask(model=model, losses=losses,
                     time_sampler=build_time_sampler(cfg.gaussian.time_sampler, diffusion.num_timesteps),
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: ddpm_preview(cfg, diffusion, ema_model, generator),
                     architecture_sections=DDPM_ARCHITECTURE[cfg.network])


DDPM_ARCHITECTURE = {Network.UNET: ("unet", "gaussian", "data.size"), Network.MLP: ("mlp", "gaussian")}


# ---- text-to-image Gaussian DDPM (pixels or tokenizer latents) ----------------------------------------

TEXT_DDPM_ARCHITECTURE = ("unet", "gaussian", "text", "data.size", "tokenizer.path")


def is_text_ddpm(cfg: ExperimentConfig) -> bool:
    return cfg.model is ModelType.DDPM and (cfg.unet.text or cfg.gaussian.space is DiffusionSpace.LATENT)


def build_ddpm_model(cfg: ExperimentConfig, tokenizer=None) -> nn.Module:
    """The trained part of a Gaussian model: the network, with its text encoder (a TextConditioned) when
    unet.text; `tokenizer` gives the latent shape in latent space."""
    shape = data_shape(cfg, tokenizer)
    if not cfg.unet.text:
        return build_network(cfg, shape)
    from .models.conditioned import TextConditioned
    text_encoder = build_text_encoder(cfg)
    return TextConditioned(build_network(cfg, shape, text_encoder.dim), text_encoder)


def build_train_dataset(cfg: ExperimentConfig):
    """What the trainer iterates: VQ-Diffusion and a latent DDPM read the token cache when data.tokens is set."""
    latent_ddpm = cfg.model is ModelType.DDPM and cfg.gaussian.space is DiffusionSpace.LATENT
    if cfg.model is ModelType.VQ_DIFFUSION or latent_ddpm:
        return build_vq_dataset(cfg)
    return build_dataset(cfg)


@torch.no_grad()
def ddpm_latents(tokenizer, batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """Unscaled latents [B, D, h, w] of a batch: embedded cached tokens, else the encoded images."""
    if "tokens" in batch:
        return tokenizer.embed_tokens(batch["tokens"].long().reshape(-1, *grid))
    return tokenizer.encode_latents(batch["image"])


def measure_latent_scale(tokenizer, dataset, grid: tuple[int, int], count: int = 64) -> float:
    """1 / std of the first `count` items' latents (Rombach et al. 2022, Sec. 4.3.2), to 4 significant digits
    so that a resumed run measures the same value on any device."""
    from .train.loop import default_collate
    batch = default_collate([dataset[i] for i in range(min(count, len(dataset)))])
    return float(f"{1.0 / ddpm_latents(tokenizer, batch, grid).std().item():.4g}")


def shapes_evaluator(cfg: ExperimentConfig, make_pipeline):
    """(ema model, generator) -> per-image attribute accuracy on train.eval_prompts val prompts, overall and by
    object count; None unless the data are shapes and train.eval_every > 0."""
    if cfg.data.name != "shapes" or cfg.train.eval_every <= 0:
        return None
    from .data.shapes import eval_prompts
    from .eval.shapes import evaluate
    prompts = [c for c, _ in eval_prompts("val", cfg.train.eval_prompts, seed=1000, max_objects=cfg.data.max_objects)]

    def run(ema_model, generator) -> dict:
        pipe, images = make_pipeline(ema_model), []
        for i in range(0, len(prompts), 50):
            images += pipe(prompts[i:i + 50], generator=generator, progress=False)
        groups = evaluate(images, prompts).groups
        return {name: groups[name]["image"] for name in ("all", "1 object", "2 objects") if name in groups}

    return run


def build_text_ddpm_task(cfg: ExperimentConfig) -> TrainTask:
    """Captions -> text encoder -> cross-attention UNet, diffusing pixels or the tokenizer's scaled latents."""
    from .gaussian_pipeline import GaussianTextToImagePipeline
    if not cfg.unet.text or cfg.network is not Network.UNET:
        raise ConfigError("gaussian.space=latent is text-to-image here: it needs network: unet and unet.text: true")
    tokenizer = None
    if cfg.gaussian.space is DiffusionSpace.LATENT:
        tokenizer = load_configured_tokenizer(cfg).eval().requires_grad_(False)
        grid = token_grid(cfg, tokenizer)
        if cfg.gaussian.latent_scale is None:  # stored in the config that the run and its checkpoints save
            cfg.gaussian.latent_scale = measure_latent_scale(tokenizer, build_train_dataset(cfg), grid)
            log.info("latent scale (1 / std of the latents): %g", cfg.gaussian.latent_scale)
    diffusion = build_gaussian_diffusion(cfg)
    model = build_ddpm_model(cfg, tokenizer)

    def losses(model, batch, t, generator):
        if tokenizer is None:
            x0 = batch["image"]
        else:
            tokenizer.to(t.device)
            x0 = ddpm_latents(tokenizer, batch, grid) * cfg.gaussian.latent_scale
        return diffusion.training_losses(model, x0, t, generator=generator, captions=batch["caption"])

    def pipeline(ema_model):
        return GaussianTextToImagePipeline(cfg, ema_model, diffusion, tokenizer)

    return TrainTask(model=model, losses=losses,
                     time_sampler=build_time_sampler(cfg.gaussian.time_sampler, diffusion.num_timesteps),
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: pipeline(ema_model).preview(generator),
                     architecture_sections=TEXT_DDPM_ARCHITECTURE, evaluate=shapes_evaluator(cfg, pipeline))


def build_task(cfg: ExperimentConfig) -> TrainTask:
    if cfg.model is ModelType.DDPM:
        return build_ddpm_task(cfg)
    if cfg.model is ModelType.VQ_DIFFUSION:
        return build_vq_task(cfg)
    raise ConfigError(f"model: {cfg.model.value!r} is trained by scripts/train_vqvae.py, not this trainer")


# ---- VQ-Diffusion ---------------------------------------------------------------------------------

VQ_ARCHITECTURE = ("transformer", "text", "discrete.num_timesteps", "tokenizer.path", "data.size")


def null_text_std(cfg: ExperimentConfig, text_dim: int) -> float:
    """Per-element scale of the text features, where a learned null caption starts: feature_scale / sqrt(width)
    for L2-normalised features, 1 for un-normalised ones (layer-norm outputs)."""
    return cfg.text.feature_scale * (text_dim ** -0.5 if cfg.text.normalize else 1.0)


def build_text_encoder(cfg: ExperimentConfig):
    from .models.text import CLIPTextEncoder
    t = cfg.text
    return CLIPTextEncoder(backend=t.backend, arch=t.arch, weights=t.weights, context_length=t.context_length,
                           normalize=t.normalize, feature_scale=t.feature_scale, trainable=t.trainable)


def transformer_kwargs(cfg: ExperimentConfig) -> dict:
    from .models.transformer import TRANSFORMER_PRESETS
    tc = cfg.transformer
    size = dict(num_layers=tc.num_layers, width=tc.width, num_heads=tc.num_heads)
    if tc.preset is not None:
        if tc.preset not in TRANSFORMER_PRESETS:
            raise ConfigError(f"transformer.preset: {tc.preset!r} is not one of {sorted(TRANSFORMER_PRESETS)}")
        size = dict(TRANSFORMER_PRESETS[tc.preset])
    return dict(size, num_steps=cfg.discrete.num_timesteps, time_embedding=tc.time_embedding,
                mlp_activation=tc.mlp_activation, mlp_ratio=tc.mlp_ratio, mask_text_padding=tc.mask_text_padding,
                null_text_embedding=tc.null_text_embedding, text_drop_prob=tc.text_drop_prob, dropout=tc.dropout,
                gradient_checkpointing=tc.gradient_checkpointing, qk_init_std=tc.qk_init_std)


def build_vq_model(cfg: ExperimentConfig, num_classes: int, grid_size: tuple[int, int]):
    """The trained part of a text-to-image model: DiffusionTransformer + its text encoder."""
    from .models.conditioned import TextConditioned
    from .models.transformer import DiffusionTransformer
    text_encoder = build_text_encoder(cfg)
    transformer = DiffusionTransformer(num_classes=num_classes, grid_size=grid_size, text_dim=text_encoder.dim,
                                       text_length=cfg.text.context_length,
                                       null_text_std=null_text_std(cfg, text_encoder.dim),
                                       **transformer_kwargs(cfg))
    return TextConditioned(transformer, text_encoder)


def build_discrete_diffusion(cfg: ExperimentConfig, num_classes: int):
    from .diffusion.discrete import MaskAndReplaceDiffusion
    d = cfg.discrete
    return MaskAndReplaceDiffusion(num_classes, d.num_timesteps, schedule=d.schedule, aux_weight=d.aux_weight,
                                   adaptive_aux_weight=d.adaptive_aux_weight, mask_weight=tuple(d.mask_weight),
                                   time_sampler=build_time_sampler(d.time_sampler, d.num_timesteps, ema_decay=0.9))


def load_configured_tokenizer(cfg: ExperimentConfig):
    from .io.tokenizer import load_tokenizer
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: a VQ-Diffusion model needs a trained tokenizer directory "
                          "(train one with scripts/train_vqvae.py; it writes <run>/tokenizer)")
    return load_tokenizer(cfg.tokenizer.path)


def token_grid(cfg: ExperimentConfig, tokenizer=None) -> tuple[int, int]:
    """(h, w) of the token grid: data.size over the tokenizer's downsampling, or, without a tokenizer (before it
    is trained), over the one cfg.tokenizer.ch_mult gives."""
    factor = tokenizer.downsample_factor if tokenizer is not None else 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    side = cfg.data.size // factor
    return (side, side)


def build_vq_dataset(cfg: ExperimentConfig, split: str = "train"):
    """The token cache when data.tokens is set (no image encoder per step), else the image data set."""
    if cfg.data.tokens is None:
        return build_tokenizer_data(cfg, split)
    from .data.tokens import TokenDataset, dataset_fingerprint
    # refuse a cache made from other data or by another tokenizer than the config names
    return TokenDataset(cfg.data.tokens, expect_fingerprint=dataset_fingerprint(build_tokenizer_data(cfg, split)),
                        expect_tokenizer=cfg.tokenizer.path, seed=cfg.data.seed)


def build_vq_task(cfg: ExperimentConfig) -> TrainTask:
    from .pipeline import TextToImagePipeline
    tokenizer = load_configured_tokenizer(cfg).eval().requires_grad_(False)
    diffusion = build_discrete_diffusion(cfg, tokenizer.num_embeddings)
    model = build_vq_model(cfg, tokenizer.num_embeddings, token_grid(cfg, tokenizer))

    def losses(model, batch, t, generator):
        if "tokens" in batch:
            x0 = batch["tokens"]
        else:
            tokenizer.to(batch["image"].device)
            with torch.no_grad():
                x0 = tokenizer.encode(batch["image"]).flatten(1)  # [B, N]
        return diffusion.training_losses(model, x0, t, generator=generator, captions=batch["caption"])

    def pipeline(ema_model):
        return TextToImagePipeline(cfg, tokenizer, ema_model, diffusion)

    return TrainTask(model=model, losses=losses, time_sampler=diffusion.time_sampler,
                     num_timesteps=diffusion.num_timesteps,
                     make_samples=lambda ema_model, generator: pipeline(ema_model).preview(generator),
                     architecture_sections=VQ_ARCHITECTURE, sampler_term="kl",
                     evaluate=shapes_evaluator(cfg, pipeline))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(cfg: ExperimentConfig, num_classes: int | None = None) -> dict[str, int]:
    """Parameters per part of a config's networks, built on the meta device (instant, no memory).

    For VQ-Diffusion, K comes from `num_classes`, else the tokenizer at tokenizer.path, else
    tokenizer.num_embeddings; the grid is data.size over the tokenizer's downsampling."""
    if (cfg.model is ModelType.VQ_DIFFUSION or is_text_ddpm(cfg)) and cfg.text.backend == "open_clip":
        cfg = copy.deepcopy(cfg)
        cfg.text.weights = "none"  # counting needs the architecture only, not the local weights file
    # a trained tokenizer holds real weights: loaded on the CPU, outside the meta device
    uses_tokenizer = cfg.model is ModelType.VQ_DIFFUSION or (is_text_ddpm(cfg)
                                                            and cfg.gaussian.space is DiffusionSpace.LATENT)
    has_tokenizer = uses_tokenizer and cfg.tokenizer.path is not None and Path(cfg.tokenizer.path).exists()
    tokenizer = load_configured_tokenizer(cfg) if has_tokenizer else None
    with torch.device("meta"):
        if cfg.model is ModelType.VQ_DIFFUSION:
            from .models.transformer import parameter_counts as transformer_counts
            grid = token_grid(cfg, tokenizer)
            if tokenizer is not None:
                num_classes = num_classes or tokenizer.num_embeddings
            model = build_vq_model(cfg, num_classes or cfg.tokenizer.num_embeddings, grid)
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


def seed_everything(seed: int) -> None:
    """Entry points only (never library code): makes weight init reproducible."""
    torch.manual_seed(seed)


# ---- tokenizer ----

def build_tokenizer(cfg: ExperimentConfig):
    """A new (untrained) GumbelVQVAE from cfg.tokenizer's architecture, for images of cfg.data.size."""
    from .models.vqvae import GumbelVQVAE
    t = cfg.tokenizer
    return GumbelVQVAE(resolution=cfg.data.size, ch=t.ch, ch_mult=t.ch_mult, num_res_blocks=t.num_res_blocks,
                       attn_resolutions=t.attn_resolutions, z_channels=t.z_channels, dropout=t.dropout,
                       norm_groups=t.norm_groups, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                       straight_through=t.straight_through, kl_weight=t.kl_weight, temperature=t.temperature_start,
                       encoder=t.encoder.value)


def load_trained_tokenizer(cfg: ExperimentConfig, device: str = "cpu"):
    """The trained tokenizer at cfg.tokenizer.path (a directory written by train_vqvae / save_tokenizer)."""
    from .io.tokenizer import load_tokenizer
    if cfg.tokenizer.path is None:
        raise ConfigError("tokenizer.path: set it to a trained tokenizer directory (e.g. runs/vqvae_shapes/tokenizer)")
    return load_tokenizer(cfg.tokenizer.path, device)


def build_vqvae_loss(cfg: ExperimentConfig):
    from .train.vqvae_losses import VQVAELoss
    t = cfg.tokenizer
    return VQVAELoss(recon=t.recon, codebook_weight=t.codebook_weight, disc_weight=t.disc_weight,
                     disc_start=t.disc_start, perceptual_weight=t.perceptual_weight,
                     perceptual_path=t.perceptual_path)


CAPTION_DATA = ("captions", "coco")


def build_caption_dataset(cfg: ExperimentConfig, split: str = "train"):
    """data.name "captions": data.root (or data.root/<split> when it exists) holding metadata.jsonl or image +
    same-name .txt files; "coco": data.root with annotations/captions_<split>2017.json and <split>2017/."""
    from pathlib import Path

    from .data.captions import CocoCaptions, caption_folder
    d = cfg.data
    if d.root is None:
        raise ConfigError(f"data.root: the {d.name!r} data set needs a local folder (data.root=PATH)")
    root = Path(d.root)
    if d.name == "coco":
        return CocoCaptions(root / f"{split}2017", root / "annotations" / f"captions_{split}2017.json", d.size, d.seed)
    if d.name == "captions":
        if (root / split).is_dir():
            return caption_folder(root / split, d.size, d.seed)
        if split != "train":
            raise ConfigError(f"data.root: {root} has no {split}/ folder for the {split!r} split")
        return caption_folder(root, d.size, d.seed)
    raise ConfigError(f"data.name: {d.name!r} is not a captioned data set; choose one of {CAPTION_DATA}")


def build_tokenizer_data(cfg: ExperimentConfig, split: str = "train"):
    """The images a tokenizer trains on or encodes: caption data sets here, the others via build_dataset."""
    if cfg.data.name in CAPTION_DATA:
        return build_caption_dataset(cfg, split)
    return build_dataset(cfg, split)
