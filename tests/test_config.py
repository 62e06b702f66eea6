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
    assert load_config(None, ["tokenizer.encoder=patch"]).tokenizer.encoder.value == "patch"
    with pytest.raises(ConfigError, match="tokenizer.encoder: 'conv' is not one of \\['taming', 'patch'\\]"):
        load_config(None, ["tokenizer.encoder=conv"])


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
