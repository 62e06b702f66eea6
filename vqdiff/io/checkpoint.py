"""Checkpoint directories, written atomically.

    <run>/checkpoints/step_00001000/
        config.yaml          the resolved experiment config
        model.safetensors    trained weights
        ema.safetensors      EMA weights (what sampling uses)
        optimizer.pt         optimizer state
        state.pt             step, time-sampler history, RNG states, format_version
        manifest.json        each file's size and sha256, written last (vqdiff/io/manifest.py)

Everything is written into `step_XXXXXXXX.tmp` and renamed when complete, so a crash never leaves a
half-written checkpoint where `latest_checkpoint` would find it. Tensors load with safetensors or
`torch.load(weights_only=True)`; each file is checked against the manifest before it is read, and every load
error names the file.
"""

import contextlib
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import FORMAT_VERSION, ConfigError, load_config, save_config, to_dict
from ..errors import UserError
from .manifest import directory_problems, newest_intact, verify_file, write_manifest
from ..models.loading import load_exactly

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model or config."""


def save_weights(state: dict, path: "str | Path") -> None:
    # safetensors refuses tensors that share storage: those get their own copy, the rest are written as they are
    # (copying everything held a B-size model's weights once more while it was saved).
    seen, tensors = set(), {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if storage in seen else value
        seen.add(storage)
    save_file(tensors, str(path))


def load_weights(path: "str | Path") -> dict:
    path = _checked(path, "weights file")
    try:
        weights = load_file(str(path))
    except SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
    for key, value in weights.items():
        if value.is_floating_point() and torch.isnan(value).any():
            raise CheckpointError(f"{path} holds NaN weights ({key}): the run diverged before it was saved; "
                                  "use an earlier checkpoint")
    return weights


def load_torch(path: "str | Path"):
    """A trainer-state file (optimizer.pt, state.pt): tensors and plain containers only, never code."""
    path = _checked(path, "file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is not a readable torch file ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'empty or cut short'})") from error


def _checked(path: "str | Path", what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    problem = verify_file(path)
    if problem is not None:
        raise CheckpointError(problem)
    return path


def load_into(module: torch.nn.Module, state: dict, what: str) -> None:
    """Strict loading; the CheckpointError names every missing, unexpected or mis-shaped key."""
    load_exactly(module, state, what, CheckpointError)


def save_checkpoint(run_dir: Path, step: int, config, model_state: dict, ema_state: dict,
                    optimizer_state: dict, state: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_config(config, tmp / "config.yaml")
        save_weights(model_state, tmp / "model.safetensors")
        save_weights(ema_state, tmp / "ema.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save({**state, "step": step, "format_version": FORMAT_VERSION}, tmp / "state.pt")
        write_manifest(tmp)
        _fsync_dir(tmp)
    except BaseException:  # a full disk or an interrupt: leave no partial directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(path: "str | Path") -> Iterator[Path]:
    """A temporary sibling of `path` to write into; it replaces `path` only once the block completes, so an
    interrupted save never leaves a half-written directory in its place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException:  # as save_checkpoint: no partial directory is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def list_checkpoints(run_dir: "str | Path") -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: "str | Path") -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: "str | Path") -> Path | None:
    """The newest checkpoint whose files match its manifest (older ones are tried in turn, each skip logged);
    None when the run has no checkpoint. A CheckpointError when it has some and none verifies."""
    found = list_checkpoints(run_dir)
    intact = newest_intact(found)
    if found and intact is None:
        raise CheckpointError(f"none of the {len(found)} checkpoint(s) in {Path(run_dir) / 'checkpoints'} is intact: "
                              + "; ".join(directory_problems(found[-1])))
    return intact


def resolve_checkpoint(path: "str | Path") -> Path:
    """Accept a checkpoint directory or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "ema.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected a checkpoint directory with "
                              "config.yaml and ema.safetensors, or a run directory with checkpoints/step_*)")
    return latest


def read_config(checkpoint: Path):
    try:
        return load_config(Path(checkpoint) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint}: its config.yaml does not load: {e}") from e


def read_state(checkpoint: Path) -> dict:
    state = load_torch(Path(checkpoint) / "state.pt")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint} has format_version {version}; this vqdiff reads up to "
                              f"{FORMAT_VERSION}. Upgrade vqdiff.")
    return state


def architecture_differences(saved, current, sections: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between two configs, within the named (dotted) sections."""
    a, b = to_dict(saved), to_dict(current)
    diffs = []

    def lookup(tree, dotted):
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}")
        elif x != y:
            diffs.append(f"{prefix}: checkpoint {x!r} vs config {y!r}")

    for section in sections:
        walk(lookup(a, section), lookup(b, section), section)
    return diffs
