"""save_weights: tensors that share storage (tied weights, views) are written as separate tensors, and a tensor
with storage of its own is written without a copy."""

import torch

from vqdiff.io.checkpoint import load_weights, save_weights


def test_shared_storage_and_views_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"weight": base, "tied": base, "row": base[1], "column": base[:, 2], "own": torch.ones(5)}
    save_weights(state, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
