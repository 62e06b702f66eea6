"""DESIGN.md's layers, each importing only from the layers below it (function-level imports count):

    runtime -> errors -> validation -> options -> config -> data / models / diffusion, images -> io -> build -> pipeline
    -> train / eval / interop / serve -> cli

diffusion/, models/ and data/ never import each other; inference (pipeline/) never imports train/; no two parts
import each other, no module is over 400 lines, and scripts use no private name of vqdiff."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vqdiff"
MAX_LINES = 400

BOTTOM = {"config", "options", "validation", "errors", "runtime"}
LEAVES = {"data", "models", "diffusion", "images"}
# each part of vqdiff (a subpackage or a top-level module) and the parts it may import
ALLOWED = {
    "__init__": set(),
    "runtime": set(),
    "errors": {"runtime"},
    "validation": {"errors"},
    "options": set(),
    "config": {"options", "validation", "errors"},
    **{leaf: BOTTOM for leaf in LEAVES},
    "io": BOTTOM | LEAVES,
    "build": BOTTOM | LEAVES | {"io"},
    "pipeline": BOTTOM | LEAVES | {"io", "build"},
    "eval": BOTTOM | LEAVES | {"io", "build", "pipeline"},
    "interop": BOTTOM | LEAVES | {"io", "build", "pipeline"},
    "train": BOTTOM | LEAVES | {"io", "build", "pipeline", "eval"},
    "serve": BOTTOM | LEAVES | {"io", "build", "pipeline"},
    "cli": BOTTOM | LEAVES | {"io", "build", "pipeline", "eval", "interop", "train", "serve"},
}


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth of its code, relative imports resolved (against `root`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                parts = list(path.relative_to(root).with_suffix("").parts)[: -node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def vqdiff_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vqdiff" else None


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def part_imports() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> the files that import it."""
    found: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        own = part_of(path)
        for module in imported_modules(path):
            other = vqdiff_part(module)
            if other not in (None, own) and ((PACKAGE / other).is_dir() or (PACKAGE / f"{other}.py").is_file()):
                found.setdefault(own, {}).setdefault(other, []).append(path.relative_to(ROOT).as_posix())
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(path) for path in PACKAGE.rglob("*.py")}
    assert parts <= set(ALLOWED), f"parts without a layer in this test: {sorted(parts - set(ALLOWED))}"


def test_each_layer_imports_only_from_below():
    offenders = [f"{file} ({own}) imports {other}"
                 for own, imports in part_imports().items() for other, files in imports.items()
                 if other not in ALLOWED[own] for file in sorted(set(files))]
    assert not offenders, "wrong import direction:\n" + "\n".join(offenders)


def test_no_two_parts_import_each_other():
    imports = part_imports()
    cycles = sorted({tuple(sorted((a, b))) for a in imports for b in imports[a] if a in imports.get(b, {})})
    assert not cycles, f"parts that import each other: {cycles}"


def test_no_module_is_over_400_lines():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in sorted(PACKAGE.rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these modules:\n" + "\n".join(long)


def test_scripts_use_no_private_name_of_vqdiff():
    private = re.compile(r"^vqdiff(\.\w+)*\._\w+$")
    offenders = [f"{path.name} imports {module}" for path in sorted((ROOT / "scripts").glob("*.py"))
                 for module in imported_modules(path) if private.match(module)]
    assert not offenders, "scripts go through public names:\n" + "\n".join(offenders)


def test_only_text_module_imports_clip_libraries():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in ("models/text.py",) or "interop" in path.parts:
            continue
        for module in imported_modules(path):
            if module.split(".")[0] in ("open_clip", "transformers"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "open_clip/transformers belong in vqdiff/models/text.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source, wrong", [
    ("from vqdiff.models import layers\nfrom ..data import shapes\n", {"models", "data"}),
    ("def f():\n    from ..train.loop import train\n", {"train"}),
])
def test_checker_sees_a_wrong_arrow_at_any_depth(source, wrong, tmp_path):
    probe = tmp_path / "vqdiff" / "diffusion" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    found = {vqdiff_part(m) for m in imported_modules(probe, root=tmp_path)}
    assert wrong <= found and not wrong & ALLOWED["diffusion"]
