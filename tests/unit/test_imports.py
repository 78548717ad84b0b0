"""The layering of the package, as README.md states it: stages sit side by side, imports only go
downward, and the README's tree names every part of the package."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "tsgd_ray"
README = (REPO / "README.md").read_text()


def _layers() -> list[set[str]]:
    """README's "Imports go downward only: a -> {b, c} -> ...;" line, top layer first."""
    line = re.search(r"Imports go downward only: (.*?);", README, re.S).group(1)
    return [set(re.findall(r"\w+", layer)) for layer in line.split("->")]


def _parts() -> set[str]:
    """The package's top-level modules and folders (not __init__/__main__)."""
    return {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    } - {
        "__init__",
        "__main__",
    }


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsgd_ray"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tsgd_ray"))
    return out


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "skeleton", "pipeline"}
    for stage in stages:
        imported = _imports(PACKAGE / "stages" / f"{stage}.py")
        others = {m for m in imported if m.startswith("tsgd_ray.stages.") and m.split(".")[2] in stages - {stage}}
        assert not others, (stage, others)


def test_the_readme_layers_name_every_part_once():
    named = [part for layer in _layers() for part in layer]
    assert len(named) == len(set(named)), named
    assert set(named) == _parts()


def test_nothing_imports_upward_or_sideways():
    depth = {part: i for i, layer in enumerate(_layers()) for part in layer}
    parts = _parts()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part not in depth:
            continue
        for module in _imports(path):
            target = module.split(".")[1] if "." in module else ""
            if target in parts and target != part:
                assert depth[target] > depth[part], f"{rel} imports {module}: not below it in README.md's layers"


def test_the_readme_tree_names_every_part():
    tree = re.search(r"## Layout\n\n```\n(.*?)```", README, re.S).group(1)
    named = set(re.findall(r"tsgd_ray/(\w+)", tree)) | set(re.findall(r"\b(\w+)\.py\b", tree))
    assert _parts() <= named, sorted(_parts() - named)
    for path in re.findall(r"^(tsgd_ray/[\w/.]+)", tree, re.M):
        assert (REPO / path).exists(), path
