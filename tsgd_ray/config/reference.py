"""The configuration reference (docs/configuration.md), generated from the schema in config/schema.py.

Each key's type and default come from the dataclasses. Its meaning comes from the comments on and
above the field in config/schema.py, and its allowed values from the enums, the registries (label
regimes) and the range checks. So the
reference cannot drift from the code. Regenerate with
``python -m tsgd_ray.config.reference docs/configuration.md``; ``--check`` exits 1 when the file
differs from the schema (a test runs the same check).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterator

from tsgd_ray.config import schema

HEADER = """# Configuration reference

Generated from the schema in `tsgd_ray/config/schema.py` by
`python -m tsgd_ray.config.reference docs/configuration.md`. Do not edit it by hand: a test fails
when this file and the schema differ.

A config is built as **schema (the defaults below) <- a YAML file <- `key=value` overrides**. The
YAML file is a path or the name of a config shipped in `configs/` (`default`, `ucf101`, `hmdb51`,
`kinetics400`, `ssv2`), found from any directory.
`tsgd-ray config CONFIG [key=value ...]` prints the resolved result: keys whose default derives
from others (data.shards, distill.partitions, evaluate.model/width/depth, tsgf.alpha,
tracking.tracking_uri) are filled in at load, so it shows, and MLflow records, the values used. An unknown key, a wrong type or
a value out of range stops the program before any Ray work, with a message naming the full key.
Lists are written `key=[a,b]` on the command line.
"""


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the schema, as it appears in the reference."""

    key: str  # full dotted key, e.g. data.num_frames
    type: str
    default: str
    meaning: str


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """{line number: comment text} for every comment, and the lines that hold only a comment."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    own_line = {n for n, line in enumerate(source.splitlines(), 1) if line.lstrip().startswith("#")}
    return comments, own_line


def attribute_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, attribute): the comment block above it plus its trailing comment(s)}."""
    comments, own_line = _comments(source)
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
            elif isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                name = stmt.targets[0].id
            else:
                continue
            above, line = [], stmt.lineno - 1
            while line in own_line:
                above.insert(0, comments[line])
                line -= 1
            trailing = [
                comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and n not in own_line
            ]
            out[(node.name, name)] = " ".join(above + trailing).strip()
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0]).replace('`', '')}]"
    return tp.__name__


def _default_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    elif isinstance(value, list):
        value = [v.value if isinstance(v, enum.Enum) else v for v in value]
    return f"`{json.dumps(value)}`"


def _choices(tp: Any, comments: dict[tuple[str, str], str]) -> str:
    """`a`: what a means; ... for an enum whose members are commented, else ''."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return ""
    parts = [f"`{m.value}`: {comments[(tp.__name__, m.name)]}" for m in tp if comments.get((tp.__name__, m.name))]
    return "Values: " + "; ".join(parts) if parts else ""


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _description(cls: type) -> str:
    """The class docstring; '' for the signature dataclasses write when there is none."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)


def key_docs() -> Iterator[tuple[str, str, list[KeyDoc]]]:
    """Yield (section, section description, keys) for every dataclass of the schema, depth first.

    The section of the top-level scalars is ''.
    """
    comments = attribute_comments(inspect.getsource(schema))
    meta = schema.fields_meta()
    ranges = {key: m["must"][1] for key, m in meta.items() if m["must"]}
    registries = {key: m["choices"]() for key, m in meta.items() if m["choices"]}  # {key: {value: meaning}}

    def walk(cls: type, prefix: str) -> Iterator[tuple[str, str, list[KeyDoc]]]:
        hints = typing.get_type_hints(cls)
        leaves, nested = [], []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{key}."))
                continue
            owner = next(c for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))  # an inherited field
            listed = "; ".join(f"`{v}`: {m}" for v, m in registries.get(key, {}).items())
            parts = [comments.get((owner.__name__, f.name), ""), _choices(tp, comments), listed and f"Values: {listed}"]
            if key in ranges:
                parts.append(f"Must be {ranges[key]}")
            meaning = " ".join(_sentence(part) for part in parts if part)
            leaves.append(KeyDoc(key, _type_name(tp), _default_text(default), meaning))
        yield prefix.rstrip("."), _description(cls), leaves
        for tp, sub in nested:
            yield from walk(tp, sub)

    yield from walk(schema.Config, "")


def _cell(text: str) -> str:
    """Escape unescaped | and, outside code spans, < (Markdown would take <name> for an HTML tag)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "\\<")
    return re.sub(r"(?<!\\)\|", r"\\|", "`".join(parts))


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER]
    for section, description, keys in key_docs():
        out.append(f"\n## `{section}`\n" if section else "\n## Top level\n")
        if description:
            out.append(f"\n{' '.join(description.split())}\n")
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for k in keys:
            out.append(f"| `{k.key}` | {k.type} | {_cell(k.default)} | {_cell(k.meaning)} |\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or check) the configuration reference.")
    parser.add_argument("path", nargs="?", default="docs/configuration.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the schema")
    args = parser.parse_args(argv)
    text, path = render(), Path(args.path)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is out of date: run python -m tsgd_ray.config.reference {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
