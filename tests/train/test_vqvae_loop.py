"""The tokenizer trainer on a tiny VQ-VAE and 16 px shapes: it learns, resumes exactly, stops on NaN, and
leaves a trimmed tokenizer directory that loads and encodes like the trained model."""

import json

import pytest
import torch

from vqdiff import build
from vqdiff.train import tasks
from vqdiff.config import load_config
from vqdiff.data.shapes import ShapesDataset
from vqdiff.models.vqvae import GumbelVQVAE
from vqdiff.io.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_weights
from vqdiff.train.loop import TrainingDiverged
from vqdiff.io.tokenizer import load_tokenizer, save_tokenizer
from vqdiff.train.vqvae_loop import train_vqvae
from vqdiff.train.vqvae_losses import VQVAELoss

TINY = ["model=vqvae", "data.size=16", "data.batch_size=8", "tokenizer.ch=8", "tokenizer.ch_mult=[1,2]",
        "tokenizer.num_res_blocks=1", "tokenizer.z_channels=8", "tokenizer.embedding_dim=8",
        "tokenizer.num_embeddings=32", "tokenizer.norm_groups=4", "tokenizer.recon=l2",
        "tokenizer.temperature_decay=constant",
        "train.lr=3e-3", "train.adam_betas=[0.5,0.9]", "train.log_every=5", "train.num_sample_images=4"]


def config(tmp_path, steps, name="run", extra=()):
    return load_config(None, TINY + [f"name={name}", f"out_dir={tmp_path / name}", f"train.max_steps={steps}",
                                     "train.checkpoint_every=4", "train.sample_every=20", *extra])


def data(n=64):
    return ShapesDataset("train", size=16, num_samples=n, seed=0)


def small_gan_loss(cfg):
    # one PatchGAN layer with 8 channels: the default 3 layers need images of 32 px or more
    t = cfg.vqvae
    return VQVAELoss(disc_weight=t.disc_weight, disc_start=t.disc_start, disc_layers=1, disc_channels=8)


def run(cfg, resume=None, val=None):
    torch.manual_seed(cfg.seed)
    loss = small_gan_loss(cfg) if cfg.vqvae.disc_weight > 0 else tasks.build_vqvae_loss(cfg)
    return train_vqvae(cfg, build.build_tokenizer(cfg), loss, data(), resume=resume, progress=False,
                       val_dataset=val)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_learns_and_leaves_a_trimmed_tokenizer(tmp_path):
    cfg = config(tmp_path, 60)
    val = ShapesDataset("val", size=16, num_samples=16)
    run_dir = run(cfg, val=val)
    logs = records(run_dir)
    steps, final = [r for r in logs if "step" in r], logs[-1]
    # the squared error of the last log window is under a tenth of the first (about 0.68 -> 0.04)
    assert steps[-1]["rec_loss"] < 0.1 * steps[0]["rec_loss"], (steps[0]["rec_loss"], steps[-1]["rec_loss"])
    for key in ("kl", "perplexity", "usage", "temperature", "grad_norm", "psnr"):
        assert key in steps[-1]
    assert 0 < steps[-1]["usage"] <= 1 and 1 <= steps[-1]["perplexity"] <= 32
    assert (run_dir / "samples" / "step_00000060.png").is_file()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    trained = GumbelVQVAE.from_config(tokenizer.config | {"num_kept_codes": None})
    trained.load_state_dict(load_weights(latest_checkpoint(run_dir) / "model.safetensors"))
    trained.eval()
    images = torch.stack([data()[i]["image"] for i in range(64)])
    with torch.no_grad():
        # the tokens carry each image: their reconstructions beat the best constant image (the pixel mean),
        # about 0.04 against 0.074, so this is more than the white background
        recon = tokenizer.decode(tokenizer.encode(images))
        assert (recon - images).pow(2).mean() < 0.7 * (images - images.mean(0)).pow(2).mean()
        # the trimmed tokenizer keeps exactly the codes used over the training data and reconstructs the same
        used = trained.encode(images).unique()
        assert torch.equal(tokenizer.code_map, used)
        assert final["num_kept_codes"] == len(used) == tokenizer.num_embeddings
        assert torch.equal(tokenizer.full_codes(tokenizer.encode(images)), trained.encode(images))
        torch.testing.assert_close(recon, trained.decode(trained.encode(images)))
    assert final["val_psnr"] > 15


def test_resume_gives_the_same_parameters(tmp_path):
    extra = ["tokenizer.disc_weight=0.5", "tokenizer.disc_start=2", "tokenizer.dropout=0.1"]
    straight = run(config(tmp_path, 8, "straight", extra))
    run(config(tmp_path, 4, "split", extra))
    run(config(tmp_path, 8, "split", extra), resume="auto")
    a, b = (latest_checkpoint(tmp_path / name) for name in ("straight", "split"))
    assert a.name == b.name == "step_00000008"
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)
    da = torch.load(a / "state.pt", weights_only=True)["discriminator"]
    db = torch.load(b / "state.pt", weights_only=True)["discriminator"]
    for key in da:
        torch.testing.assert_close(da[key], db[key], rtol=0, atol=0)
    assert any("disc_loss" in r for r in records(straight))


def test_resume_with_another_codebook_names_the_key(tmp_path):
    run(config(tmp_path, 4))
    with pytest.raises(CheckpointError, match="vqvae.num_embeddings: checkpoint 32 vs config 64"):
        run(config(tmp_path, 8, extra=["tokenizer.num_embeddings=64"]), resume="auto")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, 20)
    torch.manual_seed(0)
    model = build.build_tokenizer(cfg)
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = forward(*args, **kwargs)
        if calls["n"] > 6:
            out["recon"] = out["recon"] * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(TrainingDiverged, match="generator loss is nan at step 6.*step_00000004"):
        train_vqvae(cfg, model, tasks.build_vqvae_loss(cfg), data(), progress=False)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step_00000004"]
    load_weights(latest_checkpoint(cfg.run_dir) / "model.safetensors")
    assert not (cfg.run_dir / "tokenizer").exists()


def test_tokenizer_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = GumbelVQVAE(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=8,
                        embedding_dim=8, num_embeddings=16, norm_groups=4).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    trimmed = model.keep_codes(torch.tensor([1, 5, 7, 9]))
    for tokenizer in (model, trimmed):
        loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
        assert loaded.config == tokenizer.config
        assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tok" / "config.json").write_text(json.dumps(model.config | {"num_embeddings": 32}))
    with pytest.raises(CheckpointError, match="quantize.embed.weight"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_tokenizer(tmp_path / "tok")


def test_configs_build_the_intended_architectures():
    from vqdiff.models.vqvae import GUMBEL_F8_CONFIG
    with torch.device("meta"):
        f8 = build.build_tokenizer(load_config("configs/vqvae_f8_gumbel.yaml"))
        published = GumbelVQVAE.from_config(GUMBEL_F8_CONFIG)
        shapes = build.build_tokenizer(load_config("configs/vqvae_shapes.yaml"))
    # same names and shapes as the published f8 model, so converted taming weights load
    assert {k: v.shape for k, v in f8.state_dict().items()} == {k: v.shape for k, v in published.state_dict().items()}
    assert f8.downsample_factor == 8 and f8.codebook_size == 8192
    assert shapes.config["resolution"] // shapes.downsample_factor == 16 and shapes.codebook_size == 512


def test_decoder_finetune_steps_train_only_the_decoder_on_argmax_codes(tmp_path):
    """The last steps leave encoder, quant_conv and codebook as they were and lower the error of decoding
    the argmax codes below that of the same number of ordinary (Gumbel-sampled) steps."""
    extra = ["tokenizer.temperature_start=2.0", "tokenizer.temperature_end=2.0", "train.checkpoint_every=30"]
    run_dir = run(config(tmp_path, 60, "ft", extra + ["tokenizer.decoder_finetune_steps=30"]))
    before, after = (load_weights(run_dir / "checkpoints" / f"step_{s:08d}" / "model.safetensors") for s in (30, 60))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    images = torch.stack([data()[i]["image"] for i in range(64)])

    def argmax_error(state):
        model = build.build_tokenizer(config(tmp_path, 60, "ft", extra)).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            return float((model.decode(model.encode(images)) - images).pow(2).mean())

    control = run(config(tmp_path, 60, "control", extra))  # the same 60 steps, all with Gumbel samples
    control_state = load_weights(latest_checkpoint(control) / "model.safetensors")
    assert argmax_error(after) < min(argmax_error(before), argmax_error(control_state))
