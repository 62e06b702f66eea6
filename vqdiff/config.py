"""Typed experiment configs: dataclasses loaded from YAML, with `key.sub=value` overrides.

A YAML file lists only what differs from the defaults below. Unknown keys, wrong types and missing files fail
with a message that names them. The resolved config is saved with each checkpoint, so a run can be rebuilt.
"""

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .validation import check_config
from .options import (Activation, BetaSchedule, DataName, DiscreteSchedule, LossType, MeanType, ReconLoss, Sampler,
                      SamplingStrategy, TemperatureDecay, TextBackend, TimeEmbedding, TimeSampler, Toy2D,
                      TransformerPreset, VarType)

FORMAT_VERSION = 1


class ModelType(str, enum.Enum):
    DDPM = "ddpm"          # Gaussian diffusion on pixels or vectors (UNet or MLP)
    VQ_DIFFUSION = "vq"    # mask-and-replace diffusion on VQ tokens (DiffusionTransformer)
    VQVAE = "vqvae"        # the Gumbel VQ-VAE tokenizer itself


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"      # from train.lr at the end of the warm-up to 0 at train.max_steps


class MixedPrecision(str, enum.Enum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"  # bfloat16 autocast over float32 weights, also on a CPU with AVX-512 BF16


class TokenizerEncoder(str, enum.Enum):
    TAMING = "taming"      # the taming-transformers encoder (released checkpoints)
    PATCH = "patch"        # encoder: a code is a function of its own f x f pixels; decoder: and draws only them
    LAYERED = "layered"    # both: a code is an (outline, colour) pair, drawn as alpha over white (layered_codec.py)


class DiffusionSpace(str, enum.Enum):
    PIXEL = "pixel"        # Gaussian diffusion on the images themselves
    LATENT = "latent"      # on the tokenizer's codebook embeddings (tokenizer.path), decoded by its decoder


class Network(str, enum.Enum):
    UNET = "unet"
    MLP = "mlp"
    TRANSFORMER = "transformer"


@dataclass
class DataConfig:
    name: DataName = DataName.SHAPES
    root: str | None = None          # local folder for cifar10 / mnist / image_folder
    size: int = 64                   # image side in pixels
    num_samples: int = 20000         # generated data sets (shapes, toy2d)
    seed: int = 0
    toy: Toy2D = Toy2D.SCURVE         # toy2d: which 2-D distribution
    max_objects: int = 2             # shapes: 1 or 2 objects per image
    paraphrase: bool = False         # shapes: varied caption templates
    classes: list[int] | None = None  # keep only these labels (per-class fine-tuning)
    hflip: bool = False
    # shapes, tokenizer training only: each object's extent times U(lo, hi), centre shift of up to `shift` px at
    # 64 px, random left-right and top-bottom flips (flip: true); the scenes stay those of the split
    extent_range: list[float] | None = None
    shift: float = 0.0
    flip: bool = False
    batch_size: int = 64
    num_workers: int = 0
    tokens: str | None = None        # token cache from scripts/encode_tokens.py (VQ-Diffusion training)


@dataclass
class UNetConfig:
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    num_res_blocks: int = 2
    dropout: float = 0.1
    num_heads: int = 1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: int | None = None   # class-label conditioning
    text: bool = False               # cross-attention to the caption's token features (the `text:` encoder)
    text_drop_prob: float = 0.1      # text: caption swapped for a learned null caption (classifier-free guidance)
    position_embedding: bool = False  # a learned per-pixel embedding after the input conv: the absolute place
    grad_checkpointing: bool = False


@dataclass
class MLPConfig:
    hidden: int = 128
    num_layers: int = 3


@dataclass
class TokenizerConfig:
    """`tokenizer:` the trained tokenizer a model encodes and decodes with (VQ-Diffusion, latent DDPM)."""
    path: str | None = None          # a trained tokenizer directory (config.json + model.safetensors)


@dataclass
class VQVAEConfig:
    """`vqvae:` the Gumbel VQ-VAE to train (model: vqvae), its architecture and training losses. Before a tokenizer
    is trained, `vqdiff info` reads the token grid (ch_mult) and latent width (embedding_dim) from here.
    Older configs hold these keys under `tokenizer:`; they load as before (split_tokenizer_section)."""
    encoder: TokenizerEncoder = TokenizerEncoder.TAMING
    decoder: TokenizerEncoder = TokenizerEncoder.TAMING  # patch: each code decodes to its own f x f pixels
    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    z_channels: int = 64
    embedding_dim: int = 64
    num_embeddings: int = 1024
    factors: list[int] | None = None  # [F, S], F * S = num_embeddings: a product codebook (FactoredGumbelQuantizer)
    norm_groups: int = 32
    dropout: float = 0.0
    straight_through: bool = True
    kl_weight: float = 5.0e-4
    temperature_start: float = 1.0
    temperature_end: float = 0.0625
    temperature_steps: int = 5000
    temperature_decay: TemperatureDecay = TemperatureDecay.EXPONENTIAL
    recon: ReconLoss = ReconLoss.L1
    # the last N training steps train the decoder alone on the argmax codes that encoding will give (the
    # Gumbel samples of training differ from them, most at a high temperature); encoder and codebook frozen
    decoder_finetune_steps: int = 0
    codebook_weight: float = 1.0
    disc_weight: float = 0.0         # > 0 turns on the PatchGAN discriminator
    disc_start: int = 0
    perceptual_weight: float = 0.0
    perceptual_path: str | None = None  # local VGG16 weights; nothing is downloaded
    trim_min_count: int = 1          # after training keep codes used at least this often


VQVAE_KEYS = frozenset(f.name for f in dataclasses.fields(VQVAEConfig))


@dataclass
class TextEncoderConfig:
    backend: TextBackend = TextBackend.OPEN_CLIP
    arch: str = "clip-text-small"    # an open_clip model name (ViT-B-32, ...) or clip-text-small
    weights: str = "none"            # local weights file / HF directory; "none" = random init
    context_length: int = 77
    normalize: bool = True           # L2-normalise each token's features, as VQ-Diffusion
    feature_scale: float = 1.0       # then multiply them by this (sqrt(width) for a tower trained from scratch)
    trainable: bool = False          # train jointly (the embedded configs: no pretrained CLIP offline)


@dataclass
class TransformerConfig:
    preset: TransformerPreset | None = None  # sets num_layers, width, num_heads
    num_layers: int = 4
    width: int = 256
    num_heads: int = 8
    time_embedding: TimeEmbedding = TimeEmbedding.TABLE
    mlp_activation: Activation = Activation.GELU
    mlp_ratio: float = 4.0
    mask_text_padding: bool = True   # released models attend to all 77 positions (False)
    null_text_embedding: bool = True  # learned unconditional text for classifier-free guidance
    text_drop_prob: float = 0.1      # caption dropped for the null embedding in training
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    qk_init_std: float | None = None  # attention query/key weights at init; None: 0.02 like every layer (released)


@dataclass
class DiscreteDiffusionConfig:
    num_timesteps: int = 100
    schedule: DiscreteSchedule = DiscreteSchedule.RELEASED
    aux_weight: float = 5.0e-4
    adaptive_aux_weight: bool = True
    mask_weight: list[float] = field(default_factory=lambda: [1.0, 1.0])
    time_sampler: TimeSampler = TimeSampler.IMPORTANCE


@dataclass
class GaussianDiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = BetaSchedule.LINEAR
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: MeanType = MeanType.EPSILON  # what the network predicts
    var_type: VarType = VarType.FIXED_LARGE
    loss_type: LossType = LossType.MSE
    time_sampler: TimeSampler = TimeSampler.UNIFORM
    space: DiffusionSpace = DiffusionSpace.PIXEL
    latent_scale: float | None = None  # latent: 1 / std of the latents; None = measured on a batch at the start


@dataclass
class TrainConfig:
    max_steps: int = 10000
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT  # after the linear warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_every: int = 1
    ema_start: int = 0               # steps before the EMA starts tracking (it copies the weights until then)
    mixed_precision: MixedPrecision = MixedPrecision.NO
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    num_sample_images: int = 16
    eval_every: int = 0              # shapes text-to-image: steps between attribute-metric evaluations (0: none)
    eval_prompts: int = 50           # val prompts per evaluation, sampled with the `sample:` options
    # divergence guard (train/guard.py): stop when the gradient norm exceeds this many times the median of the
    # recent ones, or the parameter norm this many times its value at the start of the run; 0 turns a test off
    guard_grad_factor: float = 1000.0
    guard_param_factor: float = 100.0


@dataclass
class SampleConfig:
    steps: int | None = None         # None: every training step
    guidance_scale: float = 1.0
    sampler: Sampler = Sampler.DDPM  # Gaussian
    eta: float = 0.0                 # Gaussian DDIM
    clip_denoised: bool = True       # Gaussian
    quantize_latents: bool = True    # Gaussian latent: decode the nearest codes, as latent diffusion
    truncation_rate: float = 1.0     # discrete: keep this much of p(x0|x_t) per token
    temperature: float = 1.0         # discrete
    strategy: SamplingStrategy = SamplingStrategy.ANCESTRAL  # discrete


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelType = ModelType.DDPM
    network: Network = Network.UNET
    out_dir: str | None = None       # default: runs/<name>
    seed: int = 0
    format_version: int = FORMAT_VERSION
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    discrete: DiscreteDiffusionConfig = field(default_factory=DiscreteDiffusionConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    gaussian: GaussianDiffusionConfig = field(default_factory=GaussianDiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


# ---- loading ---------------------------------------------------------------------------------------

def load_config(path: "str | Path | None" = None, overrides: "list[str] | None" = None,
                cls=ExperimentConfig):
    """Read a YAML file (or start from the defaults) and apply `key.sub=value` overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    if cls is ExperimentConfig:
        data = split_tokenizer_section(data)
    for item in overrides or []:
        apply_override(data, vqvae_override(item) if cls is ExperimentConfig else item)
    config = from_dict(cls, data, where=str(path) if path else "config")
    if cls is ExperimentConfig:
        check_config(config)
    return config


def vqvae_override(item: str) -> str:
    """`tokenizer.KEY=value` for a key of the tokenizer to train, the spelling of configs before `vqvae:`, as
    `vqvae.KEY=value`: an override then replaces the file's value in either spelling."""
    key = item.split("=", 1)[0].strip()
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "tokenizer" and parts[1] in VQVAE_KEYS:
        return "vqvae." + item.strip()[len("tokenizer."):]
    return item


def split_tokenizer_section(data: dict) -> dict:
    """Configs written before `vqvae:` existed (and checkpoints saved by them) hold the tokenizer to train under
    `tokenizer:`: those keys move to `vqvae:`, so every such file loads unchanged."""
    tokenizer, names = data.get("tokenizer"), VQVAE_KEYS
    if not isinstance(tokenizer, dict) or not names & set(tokenizer):
        return data
    vqvae = data.get("vqvae") or {}
    if not isinstance(vqvae, dict):
        raise ConfigError(f"vqvae: expected a mapping for VQVAEConfig, got {vqvae!r}")
    twice = sorted(names & set(tokenizer) & set(vqvae))
    if twice:
        raise ConfigError(f"tokenizer.{twice[0]} and vqvae.{twice[0]}: one setting given twice; keep vqvae.{twice[0]}")
    moved = {k: v for k, v in tokenizer.items() if k in names}
    kept = {k: v for k, v in tokenizer.items() if k not in names}
    return {**data, "tokenizer": kept, "vqvae": {**vqvae, **moved}}


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `1e-4`, `[1,2]`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def from_dict(cls, data: dict, where: str = "config"):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
                          f"valid keys: {', '.join(sorted(names))}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}" if where != "config" else name)
              for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint, value, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if value is False and "no" in {m.value for m in hint}:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not one of {[m.value for m in hint]}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r} "
                      f"({type(value).__name__})")


def to_dict(config) -> dict:
    """Plain dict (enums as their values) for YAML."""
    def plain(v):
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(config))


def save_config(config, path: "str | Path") -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
