"""The docs cannot rot silently: the configuration reference is the schema's, and every command
shown in README.md, docs/ and infra/ parses (see tests/support/commands.py for what "parses" means)."""

from __future__ import annotations

import shlex

import pytest
from support.commands import REPO, check_command, commands_in, expand, shell_blocks

from tsgd_ray.config import reference as config_reference

DOC_FILES = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("infra/**/*.md")])


def _documented_commands() -> list:
    """Every command of every shell block, with the `export`s made earlier in its file expanded."""
    cases = []
    for path in DOC_FILES:
        env: dict[str, str] = {}
        rel = path.relative_to(REPO)
        for block in shell_blocks(path.read_text()):
            for argv in commands_in(block):
                if argv[0] == "export":
                    env.update(a.split("=", 1) for a in argv[1:])
                argv = expand(argv, env)
                cases.append(pytest.param(argv, id=f"{rel}: {shlex.join(argv)[:80]}"))
    return cases


COMMANDS = _documented_commands()


def test_every_page_with_commands_is_checked():
    """The extractor finds the commands of the pages that must have them (it cannot go blind)."""
    pages = {p.id.split(":")[0] for p in COMMANDS}
    assert {
        "README.md",
        "docs/guide.md",
        "docs/troubleshooting.md",
        "infra/aws/README.md",
        "infra/k8s/README.md",
        "infra/docker/README.md",
        "infra/mlflow/README.md",
    } <= pages
    guide = [shlex.join(p.values[0]) for p in COMMANDS if p.id.startswith("docs/guide.md")]
    assert (
        ".venv/bin/tsgd-ray run default tsgf.enabled=false" in guide and ".venv/bin/tsgd-ray compare default" in guide
    )


@pytest.mark.parametrize("argv", COMMANDS)
def test_documented_command_parses(argv):
    check_command(argv)


def test_config_reference_is_generated_from_the_schema():
    path = REPO / "docs" / "configuration.md"
    assert path.read_text() == config_reference.render(), (
        "docs/configuration.md is out of date: run python -m tsgd_ray.config.reference docs/configuration.md"
    )


def test_config_reference_covers_every_key_with_a_meaning():
    from omegaconf import OmegaConf

    from tsgd_ray.config import Config

    def leaves(node, prefix=""):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    documented = {k.key: k for _, _, keys in config_reference.key_docs() for k in keys}
    schema = set(leaves(OmegaConf.structured(Config)))
    assert set(documented) == schema
    undocumented = [k for k, doc in documented.items() if not doc.meaning or doc.meaning.startswith("Must be")]
    assert not undocumented, f"add a comment to these fields in tsgd_ray/config/schema.py: {undocumented}"
    assert "Must be in [1, 50]" in documented["distill.ipc"].meaning
    assert documented["tsgf.compensate"].type == "`none` \\| `median` \\| `shift`"


def test_comments_of_fields_are_found():
    source = """
class A:
    # above, line one
    # line two
    x: int = 1  # trailing

    y: str = "#not a comment"
    z: list = field(
        default_factory=list,
    )  # after a multi-line field
"""
    comments = config_reference.attribute_comments(source)
    assert comments[("A", "x")] == "above, line one line two trailing"
    assert comments[("A", "y")] == ""
    assert comments[("A", "z")] == "after a multi-line field"


@pytest.mark.parametrize(
    "command, error",
    [
        ("tsgd-ray run default distill.ipcs=5", "ipcs"),
        ("tsgd-ray run nosuchconfig", "config file not found"),
        ("tsgd-ray fly default", "does not parse"),
        ("python -m tsgd_ray fly default", "does not parse"),
        ("ray job submit --working-dirs . -- python -m tsgd_ray run default", "working-dirs"),
        ("ray job submit --working-dir . -- python -m tsgd_ray run default distill.ipc=0", "distill.ipc"),
        ("ray up infra/aws/no-such.yaml", "does not exist"),
        (
            "ray job submit --runtime-env infra/runtime_env.yaml --runtime-env-json {} -- python -m tsgd_ray run default",
            "Only one of",
        ),
        ("mlflow server --backend-store sqlite:///x.db", "backend-store"),
        ("python benchmarks/scaling.py --iteration 5", "no option --iteration"),
        ("terraform apply", "no check for 'terraform'"),
    ],
)
def test_the_checker_catches_broken_commands(command, error):
    from omegaconf.errors import OmegaConfBaseException

    from tsgd_ray.config import ConfigError

    with pytest.raises((AssertionError, ConfigError, OmegaConfBaseException)) as info:
        check_command(shlex.split(command))
    assert error in str(info.value)


def test_commands_are_split_like_a_shell():
    script = "A=1 tsgd-ray run default \\\n  seed=2  # a comment\n$ ray stop && echo 'a;b' | cat\n"
    assert list(commands_in(script)) == [
        ["A=1", "tsgd-ray", "run", "default", "seed=2"],
        ["ray", "stop"],
        ["echo", "a;b"],
        ["cat"],
    ]
