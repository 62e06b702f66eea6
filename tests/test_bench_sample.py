"""The sampling benchmark runs and prints its table (speed targets live in the script, not in tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqdiff import build
from vqdiff.config import load_config
from vqdiff.pipeline import TextToImagePipeline

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sample_prints_a_row_per_batch():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench_sample.py"), "--configs", "shapes", "--batch", "1",
                          "2", "--steps", "2", "--runs", "2", "3", "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| shapes")]
    assert [int(row[1]) for row in rows] == [1, 2]
    for row in rows:
        step, network, rates = float(row[2]), float(row[3]), [float(v) for v in row[7:9]]
        math = float(row[4].split()[0])  # timed alone, with the network's logits computed beforehand
        assert step > 0 and network > 0 and 0 < math < step and all(r > 0 for r in rates)


def test_bench_sample_takes_a_checkpoint(tmp_path, tokenizer_dir):
    """--checkpoint without --against: the table's row for that folder's network, schedule and prompts."""
    folder = random_pipeline_folder(tmp_path, tokenizer_dir)
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench_sample.py"), "--checkpoint", str(folder), "--batch",
                          "2", "--steps", "2", "--runs", "2", "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(f"| checkpoint {folder}")]
    assert len(rows) == 1 and int(rows[0][1]) == 2 and float(rows[0][2]) > 0, out


def side_by_side_rows(out: str) -> dict[str, list[str]]:
    return {row[1].strip(): row for row in (line.split("|")[1:-1] for line in out.splitlines())
            if len(row) == 10 and row[1].strip() in ("vqdiff", "diffusers", "vqdiff / diffusers")}


def check_side_by_side(out: str, batch: int, steps: int) -> None:
    rows = side_by_side_rows(out)
    assert set(rows) == {"vqdiff", "diffusers", "vqdiff / diffusers"}, out
    for side in ("vqdiff", "diffusers"):
        network, step, truncated, guided = (float(v) for v in rows[side][2:6])
        assert min(network, step, truncated, guided) > 0
        assert float(rows[side][6]) == pytest.approx(truncated - step, abs=0.15)
        images = [float(v) for v in rows[side][8:10]]  # whole runs of `steps` steps of `batch` images
        assert images == pytest.approx([1e3 * batch / (steps * step), 1e3 * batch / (steps * truncated)], rel=0.05)
    ratios = [float(v.strip().rstrip("x")) for v in rows["vqdiff / diffusers"][2:6] + rows["vqdiff / diffusers"][8:10]]
    columns = [*range(2, 6), 8, 9]
    assert ratios == pytest.approx([float(rows["vqdiff"][i]) / float(rows["diffusers"][i]) for i in columns],
                                   rel=0.05, abs=0.01)  # of figures rounded to 0.1 ms or 0.01 img/s
    difference = float(out.split("max |log p difference| ")[1].split(" in float32)")[0])
    assert difference < 1e-4  # the same network on both sides


def bench_against(*args, env=None) -> str:
    return subprocess.run([sys.executable, str(ROOT / "scripts/bench_sample.py"), "--against", "diffusers", "--steps",
                           "2", "--repeats", "1", "--device", "cpu", "--threads", "1", *args],
                          capture_output=True, text=True, check=True, env=env).stdout


def test_side_by_side_with_diffusers_on_a_random_config():
    """--dtype applies to both networks (here bfloat16 weights); the agreement is checked in float32 first."""
    pytest.importorskip("diffusers")
    out = bench_against("--configs", "shapes", "--batch", "2", "--dtype", "bf16-weights")
    check_side_by_side(out, batch=2, steps=2)
    assert out.startswith("# CPU, 1 threads, bf16-weights, torch "), out


def random_pipeline_folder(tmp_path, tokenizer_dir) -> Path:
    cfg = load_config(None, ["model=vq", "network=transformer", "data.size=32", f"tokenizer.path={tokenizer_dir}",
                             "text.arch=clip-text-small", "transformer.num_layers=2", "transformer.width=64",
                             "transformer.num_heads=4", "transformer.mask_text_padding=false",
                             "transformer.null_text_embedding=true", "discrete.num_timesteps=10"])
    tokenizer = build.load_configured_tokenizer(cfg)
    torch.manual_seed(0)
    model = build.build_vq_model(cfg, tokenizer.num_embeddings, build.token_grid(cfg, tokenizer))
    pipe = TextToImagePipeline(cfg, model, build.build_discrete_diffusion(cfg, tokenizer.num_embeddings), tokenizer)
    return pipe.save_pretrained(tmp_path / "pipe")


def test_side_by_side_with_a_pipeline_folder(tmp_path, tokenizer_dir):
    """--checkpoint takes the network, schedule and prompts of any folder the pipeline loads (here random)."""
    pytest.importorskip("diffusers")
    folder = random_pipeline_folder(tmp_path, tokenizer_dir)
    out = bench_against("--checkpoint", str(folder), "--batch", "2")
    check_side_by_side(out, batch=2, steps=2)
    assert f"checkpoint {folder}, batch 2" in out


def test_side_by_side_without_diffusers_says_so(tmp_path):
    (tmp_path / "diffusers.py").write_text("raise ImportError('diffusers hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = bench_against("--configs", "shapes", env=env)
    assert out.strip().splitlines() == ["diffusers is not installed (pip install -e '.[dev]'): skipping the "
                                        "side-by-side comparison"]
