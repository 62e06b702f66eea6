"""DESIGN.md's import direction: diffusion/, models/ and data/ never import each other, and none of
them imports train/, eval/, interop/, build, pipeline or cli."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vqdiff"
LEAVES = ("diffusion", "models", "data")
ABOVE = ("train", "eval", "interop", "build", "pipeline", "cli")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[: -node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module:
                names.add(node.module)
    return names


def vqdiff_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vqdiff" else None


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_packages_do_not_import_each_other(leaf):
    forbidden = set(LEAVES + ABOVE) - {leaf}
    offenders = []
    for path in sorted((PACKAGE / leaf).rglob("*.py")):
        for module in imported_modules(path):
            if vqdiff_part(module) in forbidden:
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "wrong import direction:\n" + "\n".join(offenders)


def test_only_text_module_imports_clip_libraries():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in ("models/text.py",) or "interop" in path.parts:
            continue
        for module in imported_modules(path):
            if module.split(".")[0] in ("open_clip", "transformers"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "open_clip/transformers belong in vqdiff/models/text.py:\n" + "\n".join(offenders)


def test_checker_sees_a_wrong_arrow(tmp_path):
    bad = PACKAGE / "diffusion" / "_layering_probe.py"
    bad.write_text("from vqdiff.models import layers\nfrom ..data import shapes\n")
    try:
        found = {vqdiff_part(m) for m in imported_modules(bad)}
    finally:
        bad.unlink()
    assert {"models", "data"} <= found
