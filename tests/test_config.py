import enum
import re

import pytest

from vqdiff.config import ConfigError, ExperimentConfig, ModelType, load_config, save_config, to_dict


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_values_and_overrides(tmp_path):
    path = write(tmp_path, "name: demo\nmodel: ddpm\ntrain:\n  lr: 1.0e-3\n  max_steps: 5\nunet:\n  ch_mult: [1, 2]\n")
    cfg = load_config(path, ["train.max_steps=7", "data.classes=[3]", "gaussian.beta_schedule=cosine"])
    assert cfg.name == "demo" and cfg.model is ModelType.DDPM
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7
    assert cfg.unet.ch_mult == [1, 2] and cfg.data.classes == [3]
    assert cfg.gaussian.beta_schedule == "cosine"
    assert cfg.unet.ch == ExperimentConfig().unet.ch  # untouched default


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n"))
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text, message", [
    ("train:\n  learning_rate: 0.1\n", "unknown key(s) 'learning_rate'"),
    ("trian:\n  lr: 0.1\n", "unknown key(s) 'trian'"),
    ("train:\n  max_steps: ten\n", "train.max_steps: expected int"),
    ("train:\n  max_steps: 1.5\n", "train.max_steps: expected int"),
    ("train:\n  lr: fast\n", "train.lr: expected float"),
    ("model: gan\n", "model: 'gan' is not one of"),
    ("unet:\n  ch_mult: 3\n", "unet.ch_mult: expected a list"),
    ("- 1\n- 2\n", "top level must be a mapping"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["name=x", "unet.num_classes=10", "train.adam_betas=[0.9,0.96]"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 2e-4\n"), ["train.weight_decay=1e-2"])
    assert cfg.train.lr == 2e-4 and cfg.train.weight_decay == 1e-2


def test_mixed_precision_is_checked_and_a_bare_no_reads_as_no(tmp_path):
    # YAML 1.1 turns `no` into false: the override and the file both still mean "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision.value == "no"
    assert load_config(write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision.value == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision.value == "bf16"
    with pytest.raises(ConfigError, match="train.mixed_precision: 'bf17' is not one of \\['no', 'fp16', 'bf16'\\]"):
        load_config(None, ["train.mixed_precision=bf17"])


def test_tokenizer_encoder_is_checked():
    assert load_config(None, ["tokenizer.encoder=patch"]).vqvae.encoder.value == "patch"
    with pytest.raises(ConfigError, match="vqvae.encoder: 'conv' is not one of \\['taming', 'patch', 'layered'\\]"):
        load_config(None, ["tokenizer.encoder=conv"])
    # a layered tokenizer needs both halves and a product codebook that keeps every pair
    with pytest.raises(ConfigError, match="encoder and decoder both 'layered'"):
        load_config(None, ["vqvae.encoder=layered", "vqvae.factors=[64,16]", "vqvae.trim_min_count=0"])
    with pytest.raises(ConfigError, match="vqvae.trim_min_count: 1 would drop codes"):
        load_config(None, ["vqvae.factors=[64,16]"])
    with pytest.raises(ConfigError, match="vqvae.factors: \\[64, 15\\] must be two numbers"):
        load_config(None, ["vqvae.factors=[64,15]", "vqvae.trim_min_count=0"])
    assert load_config("configs/vqvae_layered.yaml", []).vqvae.factors == [64, 16]


def test_shapes_augmentation_is_for_tokenizer_training_only():
    """data.extent_range / shift / flip change what the captions name: a text-to-image config refuses them, a
    tokenizer config trains on augmented images and keeps val images plain."""
    from vqdiff import build
    vq = ExperimentConfig(model=ModelType.VQ_DIFFUSION)
    vq.data.flip = True
    with pytest.raises(ConfigError, match="tokenizer training only"):
        build.build_dataset(vq, "train")
    tok = ExperimentConfig(model=ModelType.VQVAE)
    tok.data.extent_range, tok.data.shift, tok.data.flip = [0.5, 1.5], 2.0, True
    train, val = build.build_dataset(tok, "train"), build.build_dataset(tok, "val")
    assert (train.extent_range, train.shift, train.flip) == ((0.5, 1.5), 2.0, True)
    assert (val.extent_range, val.shift, val.flip) == (None, 0.0, False)


CLOSED_SETS = {"sample.strategy": "purity", "sample.sampler": "ddim", "gaussian.mean_type": "velocity",
               "gaussian.var_type": "learned_range", "gaussian.loss_type": "hybrid", "gaussian.beta_schedule": "cosine",
               "gaussian.time_sampler": "importance", "discrete.schedule": "absorbing",
               "discrete.time_sampler": "uniform", "text.backend": "hf", "vqvae.recon": "l2",
               "vqvae.temperature_decay": "cosine", "transformer.time_embedding": "sinusoidal",
               "transformer.mlp_activation": "quick_gelu", "transformer.preset": "B", "data.name": "toy2d",
               "data.toy": "moons"}


@pytest.mark.parametrize("key", sorted(CLOSED_SETS))
def test_a_closed_option_set_is_checked_at_load(key):
    section, name = key.split(".")
    cfg = load_config(None, [f"{key}={CLOSED_SETS[key]}"])
    value = getattr(getattr(cfg, section), name)
    assert value == CLOSED_SETS[key] and isinstance(value, enum.Enum)
    allowed = ", ".join(repr(m.value) for m in type(value))
    with pytest.raises(ConfigError, match=re.escape(f"{key}: 'typo' is not one of [{allowed}]")):
        load_config(None, [f"{key}=typo"])


def test_the_cli_offers_the_config_enums_choices(capsys):
    from vqdiff import cli
    from vqdiff.options import Sampler, SamplingStrategy
    for argv, option, values in ((["sample", "--help"], "--strategy", SamplingStrategy.values()),
                                 (["sample", "--help"], "--sampler", Sampler.values()),
                                 (["eval-shapes", "--help"], "--strategy", SamplingStrategy.values())):
        with pytest.raises(SystemExit):
            cli.COMMANDS[argv[0]](argv[1:])
        assert f"{option} {{{','.join(values)}}}" in capsys.readouterr().out


def test_the_tokenizer_to_train_is_its_own_section_and_older_files_load(tmp_path):
    older = write(tmp_path, "tokenizer:\n  path: runs/tok\n  ch_mult: [1, 2]\n  num_embeddings: 16\n")
    cfg = load_config(older, ["tokenizer.embedding_dim=8", "vqvae.z_channels=4"])
    assert cfg.tokenizer.path == "runs/tok" and not hasattr(cfg.tokenizer, "ch_mult")
    assert (cfg.vqvae.ch_mult, cfg.vqvae.num_embeddings, cfg.vqvae.embedding_dim, cfg.vqvae.z_channels) == ([1, 2], 16, 8, 4)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    # an override replaces the file's value in either spelling; the later of two overrides wins
    assert load_config(older, ["vqvae.num_embeddings=32"]).vqvae.num_embeddings == 32
    assert load_config(older, ["tokenizer.ch=8", "vqvae.ch=16"]).vqvae.ch == 16
    both = write(tmp_path, "tokenizer:\n  ch: 8\nvqvae:\n  ch: 16\n")
    with pytest.raises(ConfigError, match="tokenizer.ch and vqvae.ch: one setting given twice"):
        load_config(both)
