"""Check that a shell command shown to users parses, without running it.

`check_command("tsgd-ray run kinetics400 data.root=s3://b/k")` raises AssertionError when the
command would fail to parse. `tsgd-ray` and `python -m tsgd_ray` commands must load and validate
their config. `ray` and `mlflow` commands are parsed by their own click parsers, and the entrypoint
of `ray job submit` is checked in turn. Python scripts must accept every --option given, as their
--help shows. Files under the repository that a command names must exist. A program with no check
here fails, so a new kind of command in the docs needs a check added.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import click

REPO = Path(__file__).resolve().parents[2]
TOP_DIRS = ("infra/", "scripts/", "benchmarks/", "docs/", "tests/", "tsgd_ray/", "jobs/", "configs/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
# Programs whose arguments are not checked beyond the repository paths they name.
UNCHECKED = {
    "ulimit",
    "cd",
    "export",
    "git",
    "pip",
    "mkdir",
    "aws",
    "kubectl",
    "helm",
    "eksctl",
    "echo",
    "cat",
    "watch",
    "sleep",
    "nvidia-smi",
    "tail",
    "ls",
}
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_blocks(markdown: str) -> Iterator[str]:
    """The bodies of ```bash / ```sh / ```shell / ```console blocks (indented ones too, in lists)."""
    for match in re.finditer(r"^[ \t]*```(bash|sh|shell|console)\n(.*?)^[ \t]*```", markdown, re.S | re.M):
        yield match.group(2)


def commands_in(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script as argv lists: continuation lines joined, comments and
    `$ ` prompts dropped, split at && || ; | &."""
    script = script.replace("\\\n", " ")
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                if argv:
                    yield argv
                argv = []
            else:
                argv.append(token)
        if argv:
            yield argv


def _check_paths(argv: Sequence[str]) -> None:
    for token in argv:
        value = token.split("=", 1)[1] if "=" in token else token
        if value.startswith(TOP_DIRS) and "*" not in value and "$" not in value:
            assert (REPO / value).exists(), f"{value} (in {shlex.join(argv)}) does not exist"


def _check_tsgd_ray(argv: Sequence[str]) -> None:
    from tsgd_ray.cli import parse_args
    from tsgd_ray.config import load_config

    try:
        args = parse_args(list(argv))
    except SystemExit as exc:
        if exc.code == 0 and argv[-1] in ("--version", "--help", "-h"):
            return
        raise AssertionError(f"tsgd-ray {shlex.join(argv)}: does not parse") from exc
    with contextlib.chdir(REPO):  # a config path in the docs is relative to the repository
        load_config(args.config, args.overrides)


def _click_parse(command: click.Command, argv: Sequence[str], name: str) -> click.Context:
    """Parse `argv` with a click command, walking down groups; returns the leaf's context."""
    while isinstance(command, click.Group):
        assert argv, f"{name}: a subcommand is missing"
        sub = command.get_command(click.Context(command), argv[0])
        assert sub is not None, f"{name}: no subcommand {argv[0]!r}"
        command, name, argv = sub, f"{name} {argv[0]}", argv[1:]
    try:
        return command.make_context(name, list(argv))
    except click.ClickException as exc:
        raise AssertionError(f"{name} {shlex.join(argv)}: {exc.format_message()}") from exc


def _check_ray(argv: Sequence[str]) -> None:
    from ray.scripts.scripts import cli

    ctx = _click_parse(cli, argv, "ray")
    if argv[:2] == ["job", "submit"]:
        check_runtime_env(ctx.params["runtime_env"], ctx.params["runtime_env_json"], ctx.params["working_dir"])
        entrypoint = list(ctx.params["entrypoint"])
        assert entrypoint, "ray job submit: no entrypoint"
        check_command(entrypoint)


def check_runtime_env(path: str | None = None, json_text: str | None = None, working_dir: str | None = None) -> dict:
    """The runtime env `ray job submit` would send (read and merged as Ray does), checked by Ray's
    own parsers; unknown top-level fields are refused too (Ray would pass them on silently)."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    try:
        with contextlib.chdir(REPO):
            env = parse_runtime_env_args(runtime_env=path, runtime_env_json=json_text, working_dir=working_dir) or {}
    except ValueError as exc:
        raise AssertionError(f"ray job submit: {exc}") from exc
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"runtime env {path}: unknown fields {sorted(unknown)}"
    RuntimeEnv(**env)
    return env


def _check_mlflow(argv: Sequence[str]) -> None:
    from mlflow.cli import cli

    _click_parse(cli, argv, "mlflow")


def _check_python(argv: Sequence[str]) -> None:
    if argv[:1] == ["-m"]:
        module, args = argv[1], argv[2:]
        if module == "tsgd_ray":
            _check_tsgd_ray(args)
        elif module == "tsgd_ray.config.reference":
            from tsgd_ray.config.reference import main

            assert main([*args, "--check"]) == 0
        elif module != "pytest":
            raise AssertionError(f"python -m {module}: no check for this module in tests/support/commands.py")
        return
    script = argv[0]
    assert (REPO / script).is_file(), f"python {script}: no such file"
    if script.startswith("jobs/"):  # a job entry script is its tsgd-ray command
        _check_tsgd_ray([Path(script).stem, *argv[1:]])
        return
    help_text = _help_of(script)
    for option in (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}(?![\w-])", help_text), f"python {script}: no option {option}"


@functools.lru_cache(maxsize=None)
def _help_of(script: str) -> str:
    """`python script --help` (run once per script: it imports torch)."""
    return subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout


def _check_docker(argv: Sequence[str]) -> None:
    if argv[0] == "build":
        args = list(argv[1:])
        dockerfile = args[args.index("-f") + 1] if "-f" in args else "Dockerfile"
        assert (REPO / dockerfile).is_file(), f"docker build: no {dockerfile}"
        assert (REPO / args[-1]).is_dir(), f"docker build: the context {args[-1]} is not a folder"
    else:
        assert argv[0] in ("push", "run", "tag", "login"), f"docker {argv[0]}: no check in tests/support/commands.py"


def expand(argv: Sequence[str], env: dict[str, str]) -> list[str]:
    """Replace each word `$NAME` by the words of `env[NAME]`, as an unquoted shell expansion does."""
    out: list[str] = []
    for word in argv:
        name = word[1:] if word.startswith("$") else ""
        out.extend(shlex.split(env[name]) if name in env else [word])
    return out


def check_command(argv: Sequence[str]) -> None:
    """Raise AssertionError unless the command `argv` parses (see the module docstring)."""
    argv = list(argv)
    while argv and _ENV_ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    assert argv, "an empty command"
    _check_paths(argv)
    program, args = Path(argv[0]).name, argv[1:]
    if program == "tsgd-ray":
        _check_tsgd_ray(args)
    elif program in ("python", "python3"):
        _check_python(args)
    elif program == "ray":
        _check_ray(args)
    elif program == "mlflow":
        _check_mlflow(args)
    elif program in ("bash", "sh"):
        assert (REPO / args[0]).is_file(), f"{program} {args[0]}: no such file"
    elif program == "docker":
        _check_docker(args)
    elif program not in UNCHECKED:
        raise AssertionError(f"{shlex.join(argv)}: no check for {program!r} in tests/support/commands.py")
