"""The offline bundle (scripts/offline_bundle.py, scripts/offline_run.sh): built for this machine's
Python, it runs doctor, gpu.py and the default run in a fresh virtual environment that has torch
alone (linked from this one, nothing downloaded), from the bundle's prepared output root (no video
decoder in that environment, so a run that decoded or encoded would fail)."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import offline_bundle  # noqa: E402

TINY = ["data.builtin.train_per_class=4", "data.builtin.test_per_class=2"]
RUN = ["teacher.epochs=1", "distill.iterations=2", "evaluate.epochs=1", "evaluate.seeds=[0]", "evaluate.draws=1"]


def torch_alone() -> dict[str, metadata.Distribution]:
    """torch and what it declares (markers for this machine), as installed here."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"torch": metadata.distribution("torch"), **offline_bundle.needed(metadata.requires("torch"), set(), python)}


def test_the_closure_leaves_out_what_the_node_has_and_names_what_is_missing():
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = offline_bundle.needed(offline_bundle.ROOTS, {"numpy", "pyarrow"}, python)
    assert {"ray", "omegaconf", "mlflow-skinny", "pandas"} <= set(found)
    assert not {"numpy", "pyarrow", "torch", *offline_bundle.LEFT_OUT} & set(found)
    with pytest.raises(offline_bundle.BundleError, match="no-such-distribution is needed but not installed"):
        offline_bundle.needed(["no-such-distribution"], set(), python)


@pytest.mark.timeout(2400)
@pytest.mark.full  # the build and a whole (tiny) run: 21.6 min on 2 cores beside two other jobs (not timed idle)
def test_a_bundle_runs_the_default_run_in_an_environment_with_torch_alone(tmp_path):
    alone = torch_alone()
    have = tmp_path / "have.txt"
    have.write_text(" ".join(alone))
    bundle = tmp_path / "bundle.tar.xz"
    build = [sys.executable, "scripts/offline_bundle.py", "--have", str(have), "--preset", "0", "--out", str(bundle)]
    out = subprocess.run([*build, *TINY], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("target offline_bundle_mb: ")
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert "site/ray/_raylet.so" in names and "site/tsgd_ray/cli.py" in names
    assert not [n for n in names if n.startswith(("site/ray/jars", "site/ray/rllib", "site/av/", "site/decord/"))]
    assert any(n.startswith("outputs/default/clips/") for n in names)  # the prepared clip caches
    assert manifest["prepared_overrides"] == TINY and "torch" not in manifest["distributions"]

    # a fresh environment: torch and its dependencies linked in, nothing else
    env_dir, links = tmp_path / "fresh", tmp_path / "torch-alone"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    links.mkdir()
    for dist in alone.values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (links / top).exists():
                (links / top).symlink_to(source)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    Path(site, "torch-alone.pth").write_text(f"{links}\n")
    probe = subprocess.run([python, "-c", "import torch, ray"], capture_output=True, text=True)
    assert "No module named 'ray'" in probe.stderr  # the environment really lacks what the bundle brings

    results = tmp_path / "results"
    command = ["bash", str(REPO / "scripts" / "offline_run.sh"), str(bundle), str(results), "--cpu", *RUN]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run(
        command, cwd=tmp_path, env={**env, "PYTHON": str(python)}, capture_output=True, text=True, timeout=1200
    )
    summary = (results / "summary.txt").read_text()
    assert run.returncode == 0, summary + (results / "run.log").read_text()[-3000:]
    assert "gpu.py exit 0" in summary and "run exit 0" in summary
    assert "target default_run_cpu_rc: 0 (goal == 0) met" in summary
    log = (results / "run.log").read_text()
    assert ", 0 decoded" in log and "top-1" in log  # the prepared caches, and the results table
    assert (results / "gpu.json").exists()
