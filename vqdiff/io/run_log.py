"""A training run's log.jsonl: one JSON record per line, appended as the run goes (losses every
`train.log_every` steps, evaluations, the tokenizer it wrote)."""

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def read_log(path: "str | Path") -> list[dict]:
    """The records of a run's log. A line that does not parse (one being written, or cut short by a kill) is skipped,
    with a warning naming it."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        record = _record(line)
        if record is None:
            log.warning("%s line %d is not a JSON record (cut short?): skipped", path, number)
        else:
            records.append(record)
    return records


def rewind_log(run_dir: Path, step: int) -> None:
    """Cut the run's log.jsonl back to what it said at `step`, the checkpoint the run resumes from. Everything from
    the first record of a later step (or a line cut short by a kill) on was written by the interrupted run, and the
    resumed run logs those steps again; learning curves and time-to-accuracy must read each step once. The file is
    rewritten atomically."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    for index, line in enumerate(lines):
        record = _record(line)
        if not line.endswith("\n") or record is None or record.get("step", 0) > step:
            break
    else:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines[:index]))
    os.replace(tmp, path)
    log.info("log.jsonl: dropped its last %d line(s), written after step %d by the interrupted run",
             len(lines) - index, step)


def _record(line: str) -> "dict | None":
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
