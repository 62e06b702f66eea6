"""Allowed ranges of the numeric options, checked when a config loads and when a command parses its arguments.

Each violation is a ConfigError of one line that names the key and its allowed range, instead of a
ZeroDivisionError deep in training or an image of NaN at the end of sampling. The checks read attributes only,
so they know nothing of the config classes beyond their field names.
"""

import math
import re

from .errors import ConfigError

STEPS = re.compile(r"^(ddim)?(\d+)$")
SECTIONS = re.compile(r"^\d+(,\d+)+$")  # respacing per section: "10,10,10"


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number")
    return value


def at_least(key: str, value, low) -> None:
    if value is not None and _number(key, value) < low:
        _fail(key, value, f">= {low}")


def positive(key: str, value) -> None:
    if value is not None and _number(key, value) <= 0:
        _fail(key, value, "> 0")


def finite(key: str, value) -> None:
    if value is not None:
        _number(key, value)


def in_range(key: str, value, low, high, closed_high: bool = False, open_low: bool = False) -> None:
    if value is None:
        return
    x = _number(key, value)
    if x < low or (open_low and x == low) or x > high or (not closed_high and x == high):
        _fail(key, value, f"{'(' if open_low else '['}{low}, {high}{']' if closed_high else ')'}")


def length(key: str, value, n: int) -> None:
    if value is not None and len(value) != n:
        _fail(key, value, f"a list of {n} numbers")


def probability(key: str, value) -> None:
    in_range(key, value, 0.0, 1.0, closed_high=True)


# ---- the config ------------------------------------------------------------------------------------

def check_config(cfg) -> None:
    """Every numeric field of an ExperimentConfig within its range (the first violation is raised)."""
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_sample(cfg.sample, "sample")
    t = cfg.transformer
    for key in ("num_layers", "width", "num_heads"):
        at_least(f"transformer.{key}", getattr(t, key), 1)
    if t.width % t.num_heads:
        raise ConfigError(f"transformer.num_heads: {t.num_heads} does not divide transformer.width {t.width}")
    positive("transformer.mlp_ratio", t.mlp_ratio)
    in_range("transformer.dropout", t.dropout, 0.0, 1.0)
    probability("transformer.text_drop_prob", t.text_drop_prob)
    positive("transformer.qk_init_std", t.qk_init_std)
    u = cfg.unet
    at_least("unet.ch", u.ch, 1)
    for i, mult in enumerate(u.ch_mult):
        at_least(f"unet.ch_mult[{i}]", mult, 1)
    at_least("unet.num_res_blocks", u.num_res_blocks, 1)
    at_least("unet.num_heads", u.num_heads, 1)
    in_range("unet.dropout", u.dropout, 0.0, 1.0)
    probability("unet.text_drop_prob", u.text_drop_prob)
    at_least("mlp.hidden", cfg.mlp.hidden, 1)
    at_least("mlp.num_layers", cfg.mlp.num_layers, 1)
    _check_tokenizer(cfg.vqvae)
    at_least("text.context_length", cfg.text.context_length, 1)
    positive("text.feature_scale", cfg.text.feature_scale)
    at_least("discrete.num_timesteps", cfg.discrete.num_timesteps, 1)
    at_least("discrete.aux_weight", cfg.discrete.aux_weight, 0)
    length("discrete.mask_weight", cfg.discrete.mask_weight, 2)
    g = cfg.gaussian
    at_least("gaussian.num_timesteps", g.num_timesteps, 1)
    in_range("gaussian.beta_start", g.beta_start, 0.0, 1.0, open_low=True)
    in_range("gaussian.beta_end", g.beta_end, 0.0, 1.0, open_low=True)
    positive("gaussian.latent_scale", g.latent_scale)
    if g.beta_schedule == "linear" and g.beta_end * 1000 / g.num_timesteps >= 1:
        raise ConfigError(f"gaussian.num_timesteps: {g.num_timesteps} is too few for the linear schedule's beta_end "
                          f"{g.beta_end:g} (scaled by 1000/T it reaches 1); allowed: > {g.beta_end * 1000:g}")


def _check_data(d) -> None:
    at_least("data.size", d.size, 1)
    at_least("data.num_samples", d.num_samples, 1)
    at_least("data.max_objects", d.max_objects, 1)
    at_least("data.batch_size", d.batch_size, 1)
    at_least("data.num_workers", d.num_workers, 0)


def _check_train(t) -> None:
    at_least("train.max_steps", t.max_steps, 1)
    at_least("train.lr", t.lr, 0)
    at_least("train.weight_decay", t.weight_decay, 0)
    length("train.adam_betas", t.adam_betas, 2)
    for i, beta in enumerate(t.adam_betas):
        in_range(f"train.adam_betas[{i}]", beta, 0.0, 1.0)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    at_least("train.grad_clip", t.grad_clip, 0)
    in_range("train.ema_decay", t.ema_decay, 0.0, 1.0)
    at_least("train.ema_every", t.ema_every, 1)
    at_least("train.ema_start", t.ema_start, 0)
    at_least("train.log_every", t.log_every, 1)
    at_least("train.sample_every", t.sample_every, 0)
    at_least("train.checkpoint_every", t.checkpoint_every, 1)
    at_least("train.keep_checkpoints", t.keep_checkpoints, 0)
    at_least("train.num_sample_images", t.num_sample_images, 1)
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.eval_prompts", t.eval_prompts, 1)
    at_least("train.guard_grad_factor", t.guard_grad_factor, 0)
    at_least("train.guard_param_factor", t.guard_param_factor, 0)


def _check_tokenizer(t) -> None:
    for key in ("ch", "z_channels", "embedding_dim", "num_embeddings", "norm_groups", "num_res_blocks"):
        at_least(f"vqvae.{key}", getattr(t, key), 1)
    for i, mult in enumerate(t.ch_mult):
        at_least(f"vqvae.ch_mult[{i}]", mult, 1)
    in_range("vqvae.dropout", t.dropout, 0.0, 1.0)
    positive("vqvae.temperature_start", t.temperature_start)
    positive("vqvae.temperature_end", t.temperature_end)
    for key in ("temperature_steps", "decoder_finetune_steps", "disc_start", "kl_weight", "codebook_weight",
                "disc_weight", "perceptual_weight", "trim_min_count"):
        at_least(f"vqvae.{key}", getattr(t, key), 0)
    if t.factors is not None:
        if len(t.factors) != 2 or t.factors[0] * t.factors[1] != t.num_embeddings:
            raise ConfigError(f"vqvae.factors: {t.factors} must be two numbers whose product is vqvae.num_embeddings "
                              f"({t.num_embeddings})")
        if t.trim_min_count != 0:
            raise ConfigError(f"vqvae.trim_min_count: {t.trim_min_count} would drop codes of a product codebook "
                              "(vqvae.factors), whose unseen pairs are the point; allowed: 0")
    if (t.encoder.value == "layered") != (t.decoder.value == "layered") or (t.encoder.value == "layered"
                                                                             and t.factors is None):
        raise ConfigError(f"vqvae.encoder: a layered tokenizer needs encoder and decoder both 'layered' and "
                          f"vqvae.factors; got encoder {t.encoder.value!r}, decoder {t.decoder.value!r}, "
                          f"factors {t.factors}")


def _check_sample(s, prefix: str) -> None:
    at_least(f"{prefix}.steps", s.steps, 1)
    finite(f"{prefix}.guidance_scale", s.guidance_scale)
    at_least(f"{prefix}.eta", s.eta, 0)
    in_range(f"{prefix}.truncation_rate", s.truncation_rate, 0.0, 1.0, closed_high=True, open_low=True)
    positive(f"{prefix}.temperature", s.temperature)


# ---- command-line options --------------------------------------------------------------------------

def parse_steps(value: "str | None", option: str = "--steps") -> "int | str | None":
    """`--steps`: a count >= 1 (`25`), a Gaussian DDIM count (`ddim25`) or counts per section (`10,10,10`);
    None keeps the config's."""
    if value is None:
        return None
    text = str(value).strip()
    if SECTIONS.match(text) and all(int(n) >= 1 for n in text.split(",")):
        return text
    match = STEPS.match(text)
    if match is None or int(match.group(2)) < 1:
        raise ConfigError(f"{option}: {value!r} is not a step count; allowed: an integer >= 1, ddimN with N >= 1, "
                          "or counts per section such as 10,10,10")
    return int(match.group(2)) if match.group(1) is None else f"ddim{int(match.group(2))}"


def check_sampling_options(guidance=None, truncation=None, temperature=None, eta=None) -> None:
    """Sampling options given on a command line (None: not given)."""
    finite("--guidance", guidance)
    in_range("--truncation", truncation, 0.0, 1.0, closed_high=True, open_low=True)
    positive("--temperature", temperature)
    at_least("--eta", eta, 0)


def check_counts(**counts) -> None:
    """Counts that must be >= 1, keyword names as the options (`batch_size` -> --batch-size)."""
    for name, value in counts.items():
        at_least("--" + name.replace("_", "-"), value, 1)


def check_same_size(image_size: tuple[int, int], mask_size: tuple[int, int]) -> None:
    """Inpainting: the mask must cover the image pixel for pixel."""
    if tuple(image_size) != tuple(mask_size):
        raise ConfigError(f"--mask is {mask_size[0]}x{mask_size[1]} pixels but --init-image is "
                          f"{image_size[0]}x{image_size[1]}: they must be the same size")
