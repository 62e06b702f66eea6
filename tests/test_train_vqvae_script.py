"""scripts/train_vqvae.py and scripts/encode_tokens.py end to end, as subprocesses: a 3-step tokenizer run, then
a token cache that holds exactly the trained tokenizer's codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqdiff.data.shapes import ShapesDataset
from vqdiff.data.tokens import TokenDataset, dataset_fingerprint
from vqdiff.eval.shapes import evaluate
from vqdiff.io.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.size=16", "data.num_samples=24", "data.batch_size=4", "tokenizer.ch=8", "tokenizer.ch_mult=[1,2]",
        "tokenizer.num_res_blocks=1", "tokenizer.z_channels=8", "tokenizer.embedding_dim=8",
        "tokenizer.num_embeddings=32", "tokenizer.norm_groups=4", "tokenizer.attn_resolutions=[]"]


def run_script(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_then_encode(tmp_path):
    run = tmp_path / "run"
    run_script("scripts/train_vqvae.py", "--config", "configs/vqvae_shapes.yaml", "--no-progress", "--val-images", "8",
               *TINY, f"out_dir={run}", "train.max_steps=3", "train.checkpoint_every=3", "train.sample_every=3")
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert (run / "samples" / "step_00000003.png").is_file()
    tokenizer = load_tokenizer(run / "tokenizer")
    out = tmp_path / "tokens"
    run_script("scripts/encode_tokens.py", "--tokenizer", run / "tokenizer", "--config", "configs/vqvae_shapes.yaml",
               "--split", "val", "--out", out, "--no-progress", *TINY)
    data = ShapesDataset("val", size=16, num_samples=24)
    cache = TokenDataset(out, expect_fingerprint=dataset_fingerprint(data), expect_tokenizer=run / "tokenizer")
    assert cache.num_classes == tokenizer.num_embeddings and cache.grid_size == (8, 8)
    with torch.no_grad():
        direct = tokenizer.encode(torch.stack([data[i]["image"] for i in range(len(data))]))
    assert torch.equal(torch.stack([cache[i]["tokens"] for i in range(len(cache))]), direct.flatten(1))
    # scripts/eval_tokenizer.py on the same tokenizer: the per-attribute table of the reconstructions and the JSON
    result = run_script("scripts/eval_tokenizer.py", "--tokenizer", run / "tokenizer", "--n", "8",
                        "--out", tmp_path / "recon.png", "--json", tmp_path / "eval.json")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["images"] == 8 and report["token_grid"] == "8x8"
    val = ShapesDataset("val", size=16, num_samples=8)  # the script's images: val split, the tokenizer's size
    originals = evaluate([val[i]["image"] for i in range(8)], [val.caption(i) for i in range(8)])
    assert report["shapes_accuracy_original"] == originals.groups["all"]["image"]
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("all "))
    assert float(row[-2]) == round(100 * report["shapes_accuracy_recon"], 1)  # the table's per-image column
    assert (tmp_path / "recon.png").is_file()
    # blank-patch codes, counted patch by patch: the codes of the tokens whose 2x2 pixels are all white
    with torch.no_grad():
        tokens = tokenizer.encode(torch.stack([val[i]["image"] for i in range(8)]))
    blank = [int(tokens[i, y, x]) for i in range(8) for y in range(8) for x in range(8)
             if bool((val[i]["image"][:, 2 * y:2 * y + 2, 2 * x:2 * x + 2] == 1).all())]
    assert report["blank_patch_codes"] == len(set(blank)) > 0
    assert report["blank_patch_top_code_share"] == pytest.approx(max(map(blank.count, blank)) / len(blank))
    # --split heldout: the images whose colour-shape pairs the tokenizer never trained on
    run_script("scripts/eval_tokenizer.py", "--tokenizer", run / "tokenizer", "--n", "4", "--split", "heldout",
               "--out", tmp_path / "recon_heldout.png", "--json", tmp_path / "heldout.json")
    heldout_report = json.loads((tmp_path / "heldout.json").read_text())
    heldout = ShapesDataset("heldout", size=16, num_samples=4)
    assert heldout_report["split"] == "heldout"
    assert all(any(obj.heldout for obj in heldout.scene(i)[0]) for i in range(4))
    originals = evaluate([heldout[i]["image"] for i in range(4)], [heldout.caption(i) for i in range(4)])
    assert heldout_report["shapes_accuracy_original"] == originals.groups["all"]["image"]
