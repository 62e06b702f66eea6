"""Text-to-image Gaussian DDPMs on tiny parts: the pixel and the latent variant train, log evaluations, sample
through the shared pipeline loader and CLI, save/load; guidance 1 is unguided sampling; scripts/compare.py."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqdiff import build, cli
from vqdiff.train import tasks
from vqdiff.config import DiffusionSpace, load_config
from vqdiff.eval.compare import time_to_accuracy
from vqdiff.pipeline import GaussianTextToImagePipeline, image_tensor, load_pipeline
from vqdiff.train.loop import default_collate, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle at the top left", "a small blue square at the center"]


def tiny_config(root: Path, name: str, latent: bool, tokenizer_dir: Path, *extra):
    overrides = [f"name={name}", f"out_dir={root / name}", "data.size=32", "data.num_samples=16", "data.batch_size=4",
                 "text.context_length=24", "unet.ch=16", "unet.ch_mult=[1,2]", "unet.num_heads=2",
                 "gaussian.num_timesteps=20", "gaussian.beta_schedule=cosine", "train.max_steps=2",
                 "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0", "train.eval_every=2",
                 "train.eval_prompts=2", "train.num_sample_images=2", "sample.steps=4", "sample.guidance_scale=2.0"]
    if latent:
        overrides += [f"tokenizer.path={tokenizer_dir}", "data.tokens=null", "unet.attn_resolutions=[8,4]"]
    else:
        overrides += ["unet.attn_resolutions=[16,8]"]
    config = "ddpm_shapes_latent.yaml" if latent else "ddpm_shapes.yaml"
    return load_config(ROOT / "configs" / config, overrides + list(extra))


def run(cfg):
    tasks.seed_everything(cfg.seed)
    cfg = tasks.prepare_config(cfg)
    task = tasks.build_task(cfg)
    return train(cfg, task, build.build_train_dataset(cfg), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("runs")
    return {kind: run(tiny_config(root, kind, kind == "latent", tokenizer_dir)) for kind in ("pixel", "latent")}


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_trains_logs_evaluations_and_samples_through_the_shared_loader(runs, kind, tmp_path):
    records = [json.loads(line) for line in (runs[kind] / "log.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval" in r]
    assert [r["step"] for r in evaluations] == [2] and evaluations[0]["trained_s"] > 0
    assert set(evaluations[0]["eval"]) >= {"all", "1 object"}

    pipe = load_pipeline(runs[kind])
    assert isinstance(pipe, GaussianTextToImagePipeline) and pipe.latent == (kind == "latent")
    images = pipe(PROMPTS, torch.Generator().manual_seed(0), progress=False, steps="ddim3", sampler="ddim")
    assert [im.size for im in images] == [(32, 32)] * 2
    again = GaussianTextToImagePipeline.from_pretrained(pipe.save_pretrained(tmp_path / "pipe"))
    images_again = again(PROMPTS, torch.Generator().manual_seed(0), progress=False, steps="ddim3", sampler="ddim")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, images_again))

    out = tmp_path / "grid.png"
    assert cli.main(["sample", PROMPTS[0], "--model", str(tmp_path / "pipe"), "--steps", "ddim3", "--sampler", "ddim",
                     "--guidance", "3", "--out", str(out), "--gif", str(tmp_path / "p.gif")]) == 0
    assert Image.open(out).size[0] > 0 and (tmp_path / "p.gif").stat().st_size > 0
    assert cli.main(["sample", PROMPTS[0], "--model", str(runs[kind]), "--truncation", "0.8",
                     "--out", str(out)]) == 2  # a VQ-Diffusion option is refused, not ignored


def test_guidance_scale_one_is_unguided_sampling(runs):
    pipe = load_pipeline(runs["pixel"])
    with torch.no_grad():  # the zero-initialised output layers (barely trained) made large: the caption matters
        for p in pipe.model.network.parameters():
            if p.abs().amax() < 1e-2:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    pipe.cfg.sample.clip_denoised = False  # a random network's x0 would clip to +-1 with and without guidance
    text, mask = pipe.model.encode_text(PROMPTS)
    unguided = pipe.diffusion.sample(pipe.model.network, (2, 3, 32, 32), {"text": text, "text_mask": mask},
                                     steps=4, sampler="ddim", clip_denoised=False,
                                     generator=torch.Generator().manual_seed(5), progress=False)
    states = list(pipe.sample_iter(PROMPTS, torch.Generator().manual_seed(5), progress=False, steps=4,
                                   sampler="ddim", guidance_scale=1.0))
    torch.testing.assert_close(states[-1], unguided, rtol=0, atol=0)
    guided = list(pipe.sample_iter(PROMPTS, torch.Generator().manual_seed(5), progress=False, steps=4,
                                   sampler="ddim", guidance_scale=3.0))[-1]
    assert (guided - unguided).abs().amax() > 1e-3


def test_latent_variant_encodes_diffuses_and_decodes_through_the_tokenizer(runs, tokenizer_dir):
    pipe = load_pipeline(runs["latent"])
    cfg, tokenizer = pipe.cfg, pipe.tokenizer
    assert cfg.gaussian.space is DiffusionSpace.LATENT and pipe.shape == (16, 8, 8)
    # the scale saved with the run is 1 / std of the first training latents: they have unit variance
    batch = default_collate([build.build_train_dataset(cfg)[i] for i in range(16)])
    latents = tasks.ddpm_latents(tokenizer, batch, (8, 8))
    assert latents.shape == (16, 16, 8, 8)
    assert abs((latents * cfg.gaussian.latent_scale).std().item() - 1) < 1e-3
    assert load_config(runs["latent"] / "config.yaml").gaussian.latent_scale == cfg.gaussian.latent_scale
    # decoding the scaled latents of images gives the tokenizer's reconstruction of them
    reconstruction = tokenizer.decode(tokenizer.encode(batch["image"][:2]))
    decoded = torch.stack([image_tensor(image, 32) for image in pipe.decode(latents[:2] * cfg.gaussian.latent_scale)])
    torch.testing.assert_close(decoded, reconstruction, rtol=0, atol=1.5 / 127.5)  # 8-bit rounding
    # sampling diffuses latents, and the images decode their nearest codes at the unscaled size (or, with
    # sample.quantize_latents false, the latents themselves)
    states = list(pipe.sample_iter(PROMPTS, torch.Generator().manual_seed(0), progress=False, steps=3))
    assert len(states) == 3 and states[-1].shape == (2, 16, 8, 8)
    unscaled = states[-1] / cfg.gaussian.latent_scale
    for quantize, decoded in ((True, tokenizer.decode(tokenizer.nearest_tokens(unscaled))),
                              (False, tokenizer.decode_latents(unscaled))):
        cfg.sample.quantize_latents = quantize
        images = pipe(PROMPTS, torch.Generator().manual_seed(0), progress=False, steps=3)
        torch.testing.assert_close(torch.stack([image_tensor(image, 32) for image in images]), decoded,
                                   rtol=0, atol=1.5 / 127.5)
    assert not torch.equal(tokenizer.decode(tokenizer.nearest_tokens(unscaled)), tokenizer.decode_latents(unscaled))


def test_time_to_accuracy_reads_logged_evaluations(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 50, "loss": 0.3}, {"step": 100, "trained_s": 60.0, "eval": {"1 object": 0.5}},
        {"step": 200, "trained_s": 130.0, "eval": {"1 object": 0.85}},
        {"step": 300, "trained_s": 200.0, "eval": {"1 object": 0.9}}]) + '\n{"step": 310, "trained_s": 2')
    assert time_to_accuracy(log) == 130.0  # the last line, cut short by a kill, is skipped
    assert time_to_accuracy(log, threshold=0.95) == "not reached"
    assert time_to_accuracy(log, group="2 objects") == "not logged"
    assert time_to_accuracy(None) == "not logged"


def test_compare_script_on_two_tiny_models(runs, tmp_path, monkeypatch, capsys):
    pipeline_dir = load_pipeline(runs["latent"]).save_pretrained(tmp_path / "latent_pipe")  # no training log
    grid = tmp_path / "compare.png"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--models", str(runs["pixel"]), str(pipeline_dir), "--n", "2",
                                      "--step-counts", "2", "3", "--speed-n", "2", "--grid", str(grid),
                                      "--grid-prompts", "2", "--json", str(tmp_path / "rows.json"),
                                      "--options", "guidance_scale=1.5,steps=3", "-"])
    runpy.run_path(str(ROOT / "scripts" / "compare.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and "img/s @2" in rows[0] and "img/s @3" in rows[0]
    assert rows[1].startswith("| pixel | DDPM pixel |") and rows[1].endswith("| not reached |")
    assert rows[2].startswith("| latent_pipe | DDPM latent |") and rows[2].endswith("| not logged |")
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved[0]["options"]["guidance_scale"] == 1.5 and saved[0]["options"]["steps"] == 3
    assert saved[1]["options"]["guidance_scale"] == 2.0 and saved[1]["options"]["steps"] == 4  # its config's
    assert saved[1]["parameters"]["tokenizer"] > 0 == saved[0]["parameters"]["tokenizer"]
    assert set(saved[0]["accuracy"]) == {"1 object", "2 objects", "seen", "held-out"}
    picture = Image.open(grid)
    assert picture.height >= 2 * 128 and picture.width >= 150 + 2 * 128  # two rows of two upscaled tiles


class CaptionOracle(torch.nn.Module):
    """Knows x0 and its true caption's features: predicts the exact velocity target, off by the distance of the
    given caption's features from the true ones. The probe must then pick the true caption every time."""

    def __init__(self, diffusion, x0, true_text):
        super().__init__()
        self.diffusion, self.x0, self.true_text = diffusion, x0, true_text
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter: the probe reads the network's dtype

    def forward(self, xt, t, text, text_mask):
        target = self.diffusion.predict_v_from_xstart(xt, t, self.x0.expand_as(xt))
        return target + (text - self.true_text).pow(2).mean((1, 2))[:, None, None, None]


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_probe_scores_rewrites_by_the_training_loss_with_one_noise_draw(runs, kind, monkeypatch, capsys):
    from vqdiff.data.shapes import caption
    from vqdiff.eval import probe

    pipe = load_pipeline(runs[kind])
    images, objects = probe._one_object_images(pipe, 1, "val", 0)
    x0 = pipe.tokenizer.embed_tokens(pipe.tokenizer.encode(images)) * pipe.cfg.gaussian.latent_scale \
        if pipe.latent else images
    true_text = pipe.model.encode_text([caption(objects)])[0].detach()
    pipe.model.network = CaptionOracle(pipe.diffusion, x0, true_text)
    result = probe.probe_attributes(pipe, n=1, t=10, progress=False)
    assert result.unit == "loss" and set(result.identified.values()) == {1.0} and min(result.gain.values()) > 0
    with pytest.raises(ValueError, match="give t"):
        probe.probe_attributes(load_pipeline(runs[kind]), n=1)

    monkeypatch.setattr(sys, "argv", ["probe_shapes.py", "--checkpoint", str(runs[kind]), "--n", "2",
                                      "--t", "5", "15"])
    runpy.run_path(str(ROOT / "scripts" / "probe_shapes.py"), run_name="__main__")
    tables = capsys.readouterr().out
    assert "x_t at t = 5" in tables and "x_t at t = 15" in tables and "gain (loss)" in tables


def test_learning_curves_script_plots_logged_evaluations(tmp_path, monkeypatch, capsys):
    runs = []
    for name, accuracies in (("fast", (0.3, 0.6, 0.9)), ("slow", (0.1, 0.2, 0.4))):
        run = tmp_path / name
        run.mkdir()
        (run / "log.jsonl").write_text("\n".join(
            [json.dumps({"step": 10, "loss": 1.0})] + [json.dumps(
                {"step": 100 * (i + 1), "trained_s": 120.0 * (i + 1), "eval": {"1 object": a}})
                for i, a in enumerate(accuracies)]) + "\n")
        runs.append(str(run))
    out = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["learning_curves.py", "--runs", *runs, "--labels", "A", "B", "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "learning_curves.py"), run_name="__main__")
    table = capsys.readouterr().out
    assert "| A | 3 | 90.0 (at 6.0 min) | 4.0 min | 6.0 min |" in table
    assert "| B | 3 | 40.0 (at 6.0 min) | not reached | not reached |" in table
    picture = Image.open(out).convert("RGB")
    colours = {picture.getpixel((x, y)) for x in range(picture.width) for y in range(picture.height)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # both lines are drawn

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    monkeypatch.setattr(sys, "argv", ["learning_curves.py", "--runs", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "learning_curves.py"), run_name="__main__")
    assert exit_info.value.code == 2


def test_sweep_script_takes_gaussian_models_and_refuses_vq_tables(runs, tmp_path, monkeypatch, capsys, caplog):
    script = str(ROOT / "scripts" / "sweep_shapes.py")
    monkeypatch.setattr(sys, "argv", ["sweep_shapes.py", "--checkpoint", str(runs["latent"]), "--table", "steps",
                                      "--n", "1", "--json", str(tmp_path / "rows.json")])
    runpy.run_path(script, run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| sampler | steps | guidance | 1 object |")
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["options"]["steps"] for row in rows] == [10, 20, 20, 20]  # capped at T = 20
    assert lines[1].startswith("| ddim | 10 | 2 |")
    monkeypatch.setattr(sys, "argv", ["sweep_shapes.py", "--checkpoint", str(runs["latent"]), "--table", "truncation"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 2 and "a VQ-Diffusion table" in caplog.text


def test_gaussian_trace_decodes_the_x0_predictions_and_ends_at_the_sample(runs, monkeypatch, capsys):
    from vqdiff.eval.trace import trace_gaussian

    pipe = load_pipeline(runs["latent"])
    decoded = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda x: decoded.append(x) or decode(x))
    trace = trace_gaussian(pipe, PROMPTS, at=[0, 2, 3], seed=5, batch_size=1, progress=False, steps=4)
    assert trace.steps == [0, 2, 3] and trace.revealed is None and trace.t[0] > trace.t[1] > trace.t[2]
    # the same two batches sampled by hand from the same generator: the predicted x0 at the recorded steps, and
    # the sample itself in the last row
    generator = torch.Generator().manual_seed(5)
    states = [list(pipe.sample_states([p], generator, progress=False, steps=4)) for p in PROMPTS]
    for row, k in enumerate(trace.steps):
        key = "sample" if k == 3 else "pred_xstart"
        torch.testing.assert_close(decoded[row], torch.cat([s[k][key] for s in states]), rtol=0, atol=0)
    assert [state["t"] for state in states[0]] == [trace.t[0], states[0][1]["t"], trace.t[1], trace.t[2]]
    trace_gaussian(pipe, PROMPTS, at=[3], seed=5, progress=False, steps=4)  # one batch: the pipeline's images
    images = pipe(PROMPTS, torch.Generator().manual_seed(5), progress=False, steps=4)
    assert [im.tobytes() for im in decode(decoded[-1])] == [im.tobytes() for im in images]

    monkeypatch.setattr(sys, "argv", ["trace_shapes.py", "--checkpoint", str(runs["latent"]), "--n", "2",
                                      "--steps", "3"])
    runpy.run_path(str(ROOT / "scripts" / "trace_shapes.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["step", "t"] and [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]


def test_compare_script_refuses_options_that_do_not_fit(runs, monkeypatch, caplog):
    script = str(ROOT / "scripts" / "compare.py")
    for options, message in ((["-"], "1 entries for 2 models"), (["steps3", "-"], "'steps3' is not key=value"),
                             (["truncation_rate=0.8", "-"], "truncation_rate: not options of")):
        monkeypatch.setattr(sys, "argv", ["compare.py", "--models", str(runs["pixel"]), str(runs["latent"]),
                                          "--options", *options])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
        assert exit_info.value.code == 2 and message in caplog.text
        caplog.clear()
