"""Text-to-image end to end on tiny parts: train, resume, sample from the CLI, save/load the pipeline,
and refuse parts that do not fit."""

import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqdiff import build, cli
from vqdiff.train import tasks
from vqdiff.config import load_config
from vqdiff.eval.probe import ATTRIBUTE_VALUES, probe_attributes
from vqdiff.eval.shapes import evaluate
from vqdiff.eval.trace import COLUMNS, trace_sampling
from vqdiff.models.vqvae import GumbelVQVAE
from vqdiff.pipeline import TextToImagePipeline, image_tensor
from vqdiff.io.checkpoint import CheckpointError, latest_checkpoint, load_weights
from vqdiff.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(tmp_path, tokenizer_dir, name, steps):
    return [f"name={name}", f"out_dir={tmp_path / name}", f"tokenizer.path={tokenizer_dir}",
            f"train.max_steps={steps}", "train.checkpoint_every=4", "train.sample_every=0", "train.log_every=2",
            "data.batch_size=4", "data.num_samples=64", "transformer.width=32", "transformer.num_heads=2",
            "transformer.num_layers=1", "discrete.num_timesteps=10", "train.num_sample_images=2", "sample.steps=null",
            "data.tokens=null"]


def run(cfg, **kwargs):
    tasks.seed_everything(cfg.seed)
    return train(cfg, tasks.build_task(cfg), build.build_train_dataset(cfg), progress=False, **kwargs)


def train_resumed_equals_straight(tmp_path, tokenizer_dir):
    """8 steps straight, and 4 + 4 resumed, end at the same weights: (the straight run's config, its weights)."""
    straight = load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "a", 8))
    run(straight)
    first = load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "b", 4))
    run(first)
    run(load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "b", 8)),
        resume="auto")
    a = load_weights(latest_checkpoint(straight.run_dir) / "model.safetensors")
    b = load_weights(latest_checkpoint(first.run_dir) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    return straight, a


def test_train_resume_and_sample(tmp_path, tokenizer_dir, monkeypatch, capsys):
    straight, _ = train_resumed_equals_straight(tmp_path, tokenizer_dir)

    pipe = TextToImagePipeline.from_pretrained(straight.run_dir)
    prompts = ["a large red circle at the top left", "a small blue square at the center"]
    for options in (dict(), dict(steps=3, guidance_scale=3.0, truncation_rate=0.8),
                    dict(steps=4, strategy="purity")):
        images = pipe(prompts, generator=torch.Generator().manual_seed(0), progress=False, **options)
        assert [im.size for im in images] == [(32, 32)] * 2

    saved = pipe.save_pretrained(tmp_path / "pipe")
    again = TextToImagePipeline.from_pretrained(saved)
    g = torch.Generator().manual_seed(1)
    tokens = list(pipe.sample_iter(prompts, torch.Generator().manual_seed(1), progress=False, steps=3))[-1]
    tokens_again = list(again.sample_iter(prompts, g, progress=False, steps=3))[-1]
    assert torch.equal(tokens, tokens_again)
    assert (tokens < pipe.diffusion.mask_id).all()

    out = tmp_path / "grid.png"
    assert cli.main(["sample", prompts[0], "--model", str(saved), "--n", "2", "--steps", "3",
                     "--out", str(out), "--gif", str(tmp_path / "p.gif")]) == 0
    assert out.stat().st_size > 0 and (tmp_path / "p.gif").stat().st_size > 0
    assert cli.main(["sample", prompts[0], "--model", str(saved), "--steps", "3", "--guidance", "2",
                     "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.png")]) == 0  # a bfloat16 transformer
    reports = []
    for prompt_seed in ("1000", "7"):
        report = tmp_path / f"eval{prompt_seed}.json"
        assert cli.main(["eval-shapes", "--checkpoint", str(saved), "--n", "2", "--steps", "2", "--prompt-seed",
                         prompt_seed, "--json", str(report), "--grid", str(tmp_path / "eval.png")]) == 0
        reports.append(json.loads(report.read_text()))
    assert reports[0]["report"]["groups"]["all"]["images"] == 4 and (tmp_path / "eval.png").stat().st_size > 0
    assert reports[0]["options"]["steps"] == 2
    assert len(reports[0]["prompts"]) == 4 and reports[0]["prompts"] != reports[1]["prompts"]
    monkeypatch.setattr(sys, "argv", ["sweep_shapes.py", "--checkpoint", str(saved), "--table", "truncation",
                                      "--n", "2", "--json", str(tmp_path / "sweep.json")])
    runpy.run_path(str(ROOT / "scripts" / "sweep_shapes.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ancestral")]
    assert len(rows) == 5 and len(json.loads((tmp_path / "sweep.json").read_text())) == 5
    images[0].save(tmp_path / "init.png")
    mask = images[0].convert("L").point(lambda v: 0)
    mask.paste(255, (0, 0, 16, 32))  # regenerate the left half
    mask.save(tmp_path / "mask.png")
    assert cli.main(["sample", prompts[0], "--model", str(saved), "--steps", "3", "--out", str(out),
                     "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")]) == 0


def test_inpainting_keeps_the_known_tokens(tmp_path, tokenizer_dir):
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "c", 1))
    run(cfg)
    pipe = TextToImagePipeline.from_pretrained(cfg.run_dir)
    image = pipe(["a large red circle at the top left"], progress=False, steps=2)[0]
    known = pipe.tokenizer.encode(image_tensor(image, 32)[None]).flatten(1)
    mask = image.convert("L").point(lambda v: 0)
    mask.paste(255, (16, 0, 32, 32))  # right half regenerated: token columns 4..7
    captured = []
    original = pipe.diffusion.sample_iter

    def spy(*args, **kwargs):
        captured.append(kwargs)
        return original(*args, **kwargs)

    pipe.diffusion.sample_iter = spy
    pipe.inpaint(["a small blue square at the center"], image, mask, progress=False, steps=3)
    known_mask = captured[0]["known_mask"].reshape(8, 8)
    assert known_mask[:, :4].all() and not known_mask[:, 4:].any()
    assert torch.equal(captured[0]["known_tokens"][0], known[0])


def test_token_cache_trains_and_is_checked(tmp_path, tokenizer_dir):
    from vqdiff.data.tokens import CacheMismatch
    from vqdiff.io.token_cache import encode_token_cache
    overrides = tiny_overrides(tmp_path, tokenizer_dir, "e", 2)
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml", overrides)
    encode_token_cache(tokenizer_dir, build.build_tokenizer_data(cfg), tmp_path / "tokens", progress=False)
    cached = load_config(ROOT / "configs/shapes_tiny.yaml", overrides + [f"data.tokens={tmp_path / 'tokens'}"])
    batch = build.build_train_dataset(cached)[0]  # what `vqdiff train` / train_vq.py iterate: no encoder per step
    assert batch["tokens"].shape == (64,) and isinstance(batch["caption"], str)
    run(cached)
    changed = load_config(ROOT / "configs/shapes_tiny.yaml",
                          overrides + [f"data.tokens={tmp_path / 'tokens'}", "data.seed=5"])
    with pytest.raises(CacheMismatch, match="data set changed after encoding"):
        build.build_vq_dataset(changed)


def test_parts_that_do_not_fit_are_named(tmp_path, tokenizer_dir):
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "d", 1))
    run(cfg)
    pipe = TextToImagePipeline.from_pretrained(cfg.run_dir)
    other = GumbelVQVAE(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                        z_channels=16, embedding_dim=16, num_embeddings=24, norm_groups=8)
    with pytest.raises(CheckpointError, match="tokenizer has 24 codes but the transformer predicts 16"):
        TextToImagePipeline(pipe.cfg, pipe.model, pipe.diffusion, other)
    saved = pipe.save_pretrained(tmp_path / "p")
    (saved / "text_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing text_encoder.safetensors"):
        TextToImagePipeline.from_pretrained(saved)


def test_a_random_text_encoder_is_named_when_training_starts_not_when_loading(tmp_path, tokenizer_dir, caplog,
                                                                              monkeypatch, capsys):
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml",
                      tiny_overrides(tmp_path, tokenizer_dir, "f", 1) + ["text.trainable=false"])
    with caplog.at_level(logging.INFO, logger="vqdiff"):
        run(cfg)
    frozen = [r for r in caplog.records if "text.weights: none" in r.getMessage()]
    assert len(frozen) == 1 and frozen[0].levelno == logging.WARNING and "frozen" in frozen[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vqdiff"):
        pipe = TextToImagePipeline.from_pretrained(cfg.run_dir)
    assert not [r for r in caplog.records if "random" in r.getMessage()]

    # the attribute probe runs on it, from Python and from its script
    result = probe_attributes(pipe, n=3, progress=False)
    assert result.images == 3 and all(0 <= v <= 1 for v in result.identified.values())
    assert result.chance == {"position": 1 / 9, "colour": 1 / 6, "shape": 1 / 4, "size": 1 / 2}
    pipe.cfg.data.name = "image_folder"
    with pytest.raises(ValueError, match="data.name: 'image_folder'"):
        probe_attributes(pipe, n=1)
    pipe.cfg.data.name = "shapes"
    monkeypatch.setattr(sys, "argv", ["probe_shapes.py", "--checkpoint", str(cfg.run_dir), "--n", "2", "--t", "5"])
    runpy.run_path(str(ROOT / "scripts" / "probe_shapes.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert "x_t at t = 5" in lines[0] and [line.split()[0] for line in lines[2:]] == list(ATTRIBUTE_VALUES)


def test_the_sampling_trace_ends_at_the_sample(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """The trace's last row scores the very images the pipeline samples from the same seed (the predictions it
    adds draw no random numbers), with every token revealed; its start row has none revealed."""
    cfg = load_config(ROOT / "configs/shapes_tiny.yaml", tiny_overrides(tmp_path, tokenizer_dir, "g", 2))
    run(cfg)
    pipe = TextToImagePipeline.from_pretrained(cfg.run_dir)
    prompts = ["a large red circle at the top left", "a small blue square at the center",
               "a large green triangle at the bottom", "a small yellow diamond at the right"]
    trace = trace_sampling(pipe, prompts, seed=3, progress=False, guidance_scale=3.0)
    assert trace.steps == [-1, 0, 1, 3, 4, 5, 6, 8, 9]  # 10 steps: record_steps(10) after the start
    assert trace.revealed[0] == 0.0 and trace.revealed[-1] == 1.0
    assert all(a <= b for a, b in zip(trace.revealed, trace.revealed[1:]))
    images = pipe(prompts, torch.Generator().manual_seed(3), progress=False, guidance_scale=3.0)
    sample = evaluate(images, prompts).groups["all"]
    assert trace.scores[-1] == {c: sample[c] for c in COLUMNS}
    with pytest.raises(ValueError, match=r"steps to record must lie in \[0, 9\]"):
        trace_sampling(pipe, prompts[:1], at=[10], progress=False)
    monkeypatch.setattr(sys, "argv", ["trace_shapes.py", "--checkpoint", str(cfg.run_dir), "--n", "2",
                                      "--objects", "1", "--steps", "4"])
    runpy.run_path(str(ROOT / "scripts" / "trace_shapes.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert "2 val prompts with 1 object(s)" in lines[0] and lines[1].split()[:2] == ["step", "revealed"]
    assert [line.split()[0] for line in lines[2:]] == ["start", "1", "2", "3", "4"]


@pytest.mark.slow
def test_two_processes_train_in_sync(tmp_path, tokenizer_dir):
    """Two CPU processes (accelerate launch --multi_gpu --num_processes 2 on a machine without GPUs: torchrun +
    gloo): one checkpoint, identical replicas, merged sampler history."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts/train_vq.py"), "--config", str(ROOT / "configs/shapes_tiny.yaml"), "--no-progress",
           *tiny_overrides(tmp_path, tokenizer_dir, "ddp", 6)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "ddp")
    assert checkpoint.name == "step_00000006"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert int(state["time_sampler"]["count"].sum()) == 6 * 4 * 2  # both processes' timesteps were recorded
    assert "replicas agree" in result.stderr


def test_a_layered_tokenizer_gives_a_factored_transformer_that_trains_resumes_and_samples(tmp_path):
    """On a layered tokenizer (outline x colour codes) the transformer factors its tokens; training resumes to the
    same weights, and the saved pipeline samples the same images after loading."""
    from vqdiff.io.tokenizer import save_tokenizer
    torch.manual_seed(0)
    tokenizer = GumbelVQVAE(resolution=32, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                            z_channels=16, embedding_dim=16, num_embeddings=24, factors=(6, 4), norm_groups=8,
                            encoder="layered", decoder="layered")
    tokenizer_dir = save_tokenizer(tokenizer.trim(torch.zeros(24, dtype=torch.long), 0), tmp_path / "tok")
    straight, a = train_resumed_equals_straight(tmp_path, tokenizer_dir)
    assert any(k.endswith("content_emb.emb_first.weight") for k in a)
    pipe = TextToImagePipeline.from_pretrained(straight.run_dir)
    assert pipe.model.network.factors == (6, 4)
    prompts = ["a large red circle at the top left", "a small blue square at the center"]
    images = pipe(prompts, steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    loaded = TextToImagePipeline.from_pretrained(pipe.save_pretrained(tmp_path / "pipe"))
    again = loaded(prompts, steps=3, generator=torch.Generator().manual_seed(0), progress=False)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
