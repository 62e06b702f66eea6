"""A run directory is never overwritten by accident.

Training into a directory that already holds checkpoints needs `resume="auto"` (or a checkpoint) to continue
it, or `overwrite=True` to start over, which first removes what the earlier run wrote; otherwise the run stops
before it writes anything. Leftover `step_N.tmp` folders (a kill or a full disk during a save) are removed.
"""

import logging
import shutil
from pathlib import Path

from ..errors import UserError
from ..io.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

# what a training run writes into its directory (train/loop.py, train/vqvae_loop.py)
RUN_OUTPUTS = ("checkpoints", "samples", "tokenizer", "log.jsonl", "config.yaml")


class RunExistsError(UserError):
    """A fresh run aimed at a directory that holds an earlier run's checkpoints."""


def prepare_run_dir(run_dir: Path, resume: "str | None", overwrite: bool, main_process: bool = True) -> None:
    """Check (every process) and clean (the main process) the run directory before training starts."""
    run_dir = Path(run_dir)
    if main_process:
        for tmp in sorted((run_dir / "checkpoints").glob("step_*.tmp")):
            log.warning("removing %s, a checkpoint whose writing was interrupted", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    if resume is not None and overwrite:
        raise UserError("--resume continues a run and --overwrite starts it over: pass one of them")
    found = list_checkpoints(run_dir)
    if resume is not None or not found:
        return
    if not overwrite:
        raise RunExistsError(f"{run_dir} already holds a run (checkpoints up to {found[-1].name}); nothing was "
                             "written. Pass --resume auto to continue it, or --overwrite to delete it and start over "
                             "(or choose another out_dir)")
    if main_process:
        log.warning("--overwrite: removing the earlier run in %s (%d checkpoint(s) up to %s) before starting over",
                    run_dir, len(found), found[-1].name)
        for name in RUN_OUTPUTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
