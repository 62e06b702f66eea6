"""A directory's manifest: `manifest.json` listing each file's relative path, size and sha256, written last.

A checkpoint (or pipeline directory) with a manifest can prove that it is whole: a file cut short by a full disk,
overwritten with other bytes or deleted no longer matches its entry. Directories written before manifests
existed have none; they are taken as they are. `newest_intact` walks back from the newest of several
checkpoints to the first whose manifest verifies, logging each one it skips and why.
"""

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: "str | Path") -> Path:
    """List every file under `directory` (recursively, the manifest itself excepted) in its manifest.json."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": sha256(path)}
    target = directory / MANIFEST
    target.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1) + "\n")
    return target


def read_manifest(directory: "str | Path") -> "dict | None":
    """The manifest's {relative path: {"size", "sha256"}}; None when the directory has no manifest; a ValueError
    naming the file when it does not parse."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        return files
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error})") from error


def file_problem(path: Path, entry: dict) -> "str | None":
    """Why `path` does not match its manifest entry, or None."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{path} has {size} bytes, its manifest says {entry.get('size')} (cut short or replaced)"
    if sha256(path) != entry.get("sha256"):
        return f"{path} does not match the sha256 in its manifest (its bytes changed)"
    return None


def verify_file(path: "str | Path") -> "str | None":
    """Check one file against the manifest of its directory, when there is one; returns the problem or None."""
    path = Path(path)
    try:
        files = read_manifest(path.parent)
    except ValueError as error:
        return str(error)
    if files is None or path.name not in files:
        return None
    return file_problem(path, files[path.name])


def directory_problems(directory: "str | Path") -> list[str]:
    """Every way `directory` differs from its manifest (empty: intact, or written before manifests)."""
    directory = Path(directory)
    try:
        files = read_manifest(directory)
    except ValueError as error:
        return [str(error)]
    if files is None:
        return []
    return [problem for name, entry in files.items()
            if (problem := file_problem(directory / name, entry)) is not None]


def newest_intact(checkpoints: list[Path]) -> "Path | None":
    """The newest of `checkpoints` (sorted oldest first) whose manifest verifies; the ones skipped are logged."""
    for checkpoint in reversed(checkpoints):
        problems = directory_problems(checkpoint)
        if not problems:
            return checkpoint
        log.warning("skipping checkpoint %s: %s", checkpoint, "; ".join(problems))
    return None
