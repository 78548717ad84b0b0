"""The layering of the package: stages sit side by side, and imports only go downward."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "tsgd_ray"
# what each part may import from the package (beyond itself); absent parts: no rule
ALLOWED_BELOW = {
    "core": {"core", "config", "errors"},
    "config": {"config", "errors"},
    "storage": {"errors"},
    "data": {"data", "core", "config", "storage", "errors", "lease", "console"},
    "runtime": {"runtime", "data", "core", "config", "storage", "errors", "tracking"},
    "tracking": {"tracking", "config", "storage", "errors"},
    "layout": {"config", "storage", "methods"},
    "methods": {"config"},
    "doctor": {"core", "data", "layout", "runtime", "storage", "tracking", "errors", "config"},
    "artifacts": {"core", "data", "layout", "storage", "errors", "config"},
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


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_stage_imports_another_stage():
    stages = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "skeleton", "pipeline"}
    for stage in stages:
        imported = _imports(PACKAGE / "stages" / f"{stage}.py")
        others = {m for m in imported if m.startswith("tsgd_ray.stages.") and m.split(".")[2] in stages - {stage}}
        assert not others, (stage, others)


def test_nothing_imports_upward():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part not in ALLOWED_BELOW:
            continue
        for module in _imports(path):
            target = _part(module)
            if target and target != "__init__" and module.count(".") >= 1:
                allowed = ALLOWED_BELOW[part] | {part}
                top = module.split(".")[1]
                assert top in allowed or (top not in {p.removesuffix(".py") for p in _all_parts()}), (str(rel), module)


def _all_parts() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
