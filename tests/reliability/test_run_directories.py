"""No run destroys another: a fresh run into a directory that holds checkpoints stops before writing anything,
`--overwrite` starts over after removing the earlier run, `--resume auto` continues it; leftover `.tmp`
checkpoint folders are removed at start."""

import json
import logging

import pytest

from vqdiff import cli
from vqdiff.io.checkpoint import list_checkpoints
from vqdiff.train.run_dir import RunExistsError


def test_a_fresh_run_into_an_existing_run_changes_nothing(tiny):
    run = tiny.run(8)
    before = tiny.digests(run)
    with pytest.raises(RunExistsError, match=r"step_00000008.*--resume auto.*--overwrite"):
        tiny.run(12)
    assert tiny.digests(run) == before  # checkpoints, log.jsonl and config.yaml untouched
    with pytest.raises(RunExistsError):
        tiny.run(12, "run", init_from=str(run))  # new weights from elsewhere: still a fresh run


def test_overwrite_removes_the_earlier_run_first(tiny, caplog):
    run = tiny.run(12, "run", "train.checkpoint_every=2")
    assert len(list_checkpoints(run)) == 5
    with caplog.at_level(logging.WARNING):
        tiny.run(4, "run", overwrite=True)
    assert "--overwrite: removing the earlier run" in caplog.text
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the new run's records only


def test_resume_and_overwrite_together_are_refused(tiny):
    tiny.run(4)
    with pytest.raises(Exception, match="pass one of them"):
        tiny.run(8, resume="auto", overwrite=True)


def test_leftover_tmp_folders_are_removed_at_start(tiny):
    run = tiny.run(4)
    leftover = run / "checkpoints" / "step_00000008.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    tiny.run(8, resume="auto")
    assert not leftover.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]


def test_cli_names_both_flags_in_one_line(tmp_path, caplog):
    args = ["train", "--config", "configs/ddpm_scurve.yaml", f"out_dir={tmp_path / 'r'}", "train.max_steps=2",
            "gaussian.num_timesteps=50", "data.num_samples=600", "--no-progress"]
    assert cli.main(args) == 0
    caplog.clear()
    assert cli.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "--resume auto" in errors[0] and "--overwrite" in errors[0]
    assert cli.main(args + ["--overwrite"]) == 0


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny, caplog):
    tiny.run(8)
    with caplog.at_level(logging.WARNING):
        tiny.run(8, resume="auto")
    assert "at step 8, train.max_steps is 8: nothing left to train" in caplog.text
