"""Build an offline bundle: what a node with Python, torch and CUDA but no package index needs to
run `tsgd-ray doctor`, benchmarks/gpu.py and `tsgd-ray run default` (scripts/offline_run.sh runs
them there).

The bundle is one .tar.xz holding:
  site/            the distributions the default run needs that the node lacks (--have), unpacked
                   as site-packages for --python on --platform: Ray stripped to what core, Data and
                   Train need on one node (no jars, rllib, serve, llm, dashboard client, source
                   maps; native binaries stripped of symbols), and this package (without its
                   declared dependencies)
  outputs/default  a prepared default output root (`tsgd-ray prepare default`: the built-in
                   dataset, its shards and clip caches), so the node neither encodes nor decodes
                   video (no PyAV, no decord: 180 MB installed); its keys hold under any
                   execution-only override (devices, GPUs) and at any path
  benchmarks/      gpu.py and report.py
  offline_run.sh   the node's script; MANIFEST.json what was bundled, for which Python and platform

Versions are the ones installed beside this script (the tested set, scripts/constraints.txt). For
this interpreter's Python they are copied from its installation; for another (--python 3.12) their
wheels are fetched once into .cache/offline/wheels (pip download: that needs the package index).

    python scripts/offline_bundle.py --python 3.12          # for the lent GPU machines' image
    python scripts/offline_bundle.py --have torch-only.txt  # for a node with torch alone

It ends with `target offline_bundle_mb: <MB> (goal <= 60) met|NOT met`. Exit 2 on a user error.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
#: what the default run imports beyond torch (pillow: MLflow's images, the contact sheets); their
#: dependencies follow from their metadata
ROOTS = [
    "ray[data,train]",
    "omegaconf",
    "mlflow-skinny",
    "sqlalchemy",
    "alembic",
    "numpy",
    "pyarrow",
    "pandas",
    "pillow",
]
#: declared dependencies the default run never imports, and what they serve (MLflow's import needs
#: databricks-sdk: it probes `databricks.agents`, which fails without the package)
LEFT_OUT = {
    "gitpython": "MLflow's git commit tag (looked up only when git is importable)",
    "uvicorn": "MLflow's server",
    "tensorboardx": "Ray Tune's TensorBoard logger",
}
#: Ray's parts that a single-node core + Data + Train run never loads (ray 2.60: 33 MB of jars,
#: 17 rllib, 9 dashboard client, 6 serve, 4 llm as installed)
RAY_UNUSED = ["jars", "rllib", "serve", "llm", "dashboard/client"]
GOAL_MB = 60
PIP = [sys.executable, "-m", "pip"]
WHEELS = REPO / ".cache" / "offline" / "wheels"
DEFAULT_HAVE = REPO / "scripts" / "offline_have_gpu_image.txt"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


class BundleError(Exception):
    """A user error: one line, exit 2."""


def name_of(text: str) -> str:
    """A distribution name as PEP 503 normalises it."""
    return re.sub(r"[-_.]+", "-", text).lower()


def read_have(path: Path) -> set[str]:
    """The distributions the node has: names (any separators, `name==version` lines, # comments)."""
    if not path.is_file():
        raise BundleError(f"--have {path}: no such file")
    words = re.sub(r"#.*", "", path.read_text()).replace(",", " ").split()
    return {name_of(re.split(r"[=<>!~ ]", w)[0]) for w in words if w}


def needed(roots: list[str], have: set[str], python: str) -> dict[str, metadata.Distribution]:
    """The closure of `roots` over their declared dependencies (markers evaluated for Linux and
    `python`), less `have`, LEFT_OUT and torch's: {name: installed distribution}.

    Raises:
        BundleError: a needed distribution is not installed beside this script.
    """
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    env.update(sys_platform="linux", platform_system="Linux")
    skip = have | set(LEFT_OUT) | {"torch"}
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [r for r in map(Requirement, roots) if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
    while todo:
        req = todo.pop()
        name = name_of(req.name)
        if name in skip or (name, tuple(sorted(req.extras))) in seen:
            continue
        seen.add((name, tuple(sorted(req.extras))))
        try:
            dist = found.get(name) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise BundleError(f"{req.name} is needed but not installed here: run scripts/bootstrap.sh first") from None
        found[name] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in req.extras or {""}):
                todo.append(dep)
    return found


def copy_installed(dist: metadata.Distribution, site: Path) -> None:
    """Copy an installed distribution's files (those under its site-packages) into `site`."""
    for f in dist.files or []:
        if f.parts[0] == ".." or "__pycache__" in f.parts:  # console scripts, byte code
            continue
        source = Path(dist.locate_file(f))
        if source.is_file():
            target = site / f
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def unpack_wheel(wheel: Path, site: Path) -> None:
    """Unpack a wheel as an installation into `site` (purelib and platlib; no scripts or headers)."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            parts = Path(member.filename).parts
            if ".." in parts or Path(member.filename).is_absolute():
                raise BundleError(f"{wheel.name}: member {member.filename!r} points outside the installation")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if member.is_dir():
                continue
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(member))
            if member.external_attr >> 16 & 0o111:
                target.chmod(0o755)


def fetch_wheel(dist: metadata.Distribution, python: str, platforms: list[str], cache: Path) -> Path:
    """The wheel of `dist`'s version for CPython `python` on `platforms`, downloaded once into its
    own folder of `cache` (cp<XY>/<name>-<version>/)."""
    name, version = dist.metadata["Name"], dist.version
    folder = cache / f"cp{python.replace('.', '')}" / f"{name_of(name)}-{version}"
    if not any(folder.glob("*.whl")):
        platform_args = [a for p in platforms for a in ("--platform", p)]
        command = [*PIP, "download", "-q", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", python, "--implementation", "cp", *platform_args, "-d", str(folder)]
        out = subprocess.run([*command, f"{name}=={version}"], capture_output=True, text=True)
        if out.returncode or not any(folder.glob("*.whl")):
            raise BundleError(
                f"no wheel of {name}=={version} for CPython {python} on {platforms[0]}: {out.stderr[-300:]}"
            )
    return next(folder.glob("*.whl"))


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def strip_ray(site: Path) -> int:
    """Remove RAY_UNUSED and source maps from site/ray and strip its native binaries' symbols;
    returns the bytes saved."""
    ray = site / "ray"
    before = sum(f.stat().st_size for f in ray.rglob("*") if f.is_file())
    for part in RAY_UNUSED:
        path = ray / part
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for f in list(ray.rglob("*.map")):
        f.unlink()
    for f in ray.rglob("*"):
        if f.is_file() and not f.is_symlink() and _is_elf(f):
            subprocess.run(["strip", "--strip-unneeded", str(f)], check=True, capture_output=True)
    return before - sum(f.stat().st_size for f in ray.rglob("*") if f.is_file())


def this_package(site: Path, scratch: Path) -> None:
    """This checkout's package (a wheel built here, without its declared dependencies) into `site`."""
    out = scratch / "wheel"
    wheel = [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*wheel, "-w", str(out), str(REPO)], check=True, capture_output=True)
    unpack_wheel(next(out.glob("tsgd_ray-*.whl")), site)


def prepare_root(root: Path, overrides: list[str], scratch: Path) -> None:
    """`tsgd-ray prepare default` into `root` (dataset, shards, clip caches), less its tracking files."""
    command = [sys.executable, "-m", "tsgd_ray", "prepare", "default", f"storage.output_root={root}"]
    command += [f"ray.temp_dir={scratch / 'ray'}", *overrides]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if out.returncode:
        raise BundleError(f"tsgd-ray prepare default failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    for leftover in ("mlflow.db", "mlruns", "logs"):
        path = root / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def build(args) -> Path:
    have = read_have(Path(args.have))
    python = args.python or f"{sys.version_info.major}.{sys.version_info.minor}"
    here = python == f"{sys.version_info.major}.{sys.version_info.minor}"
    dists = needed(ROOTS, have, python)
    out = Path(args.out or REPO / ".cache" / "offline" / f"tsgd-ray-offline-cp{python.replace('.', '')}.tar.xz")
    with tempfile.TemporaryDirectory(prefix="tsgd-bundle-") as tmp:
        scratch = Path(tmp)
        bundle = scratch / "bundle"
        site = bundle / "site"
        site.mkdir(parents=True)
        for dist in dists.values():
            if here:
                copy_installed(dist, site)
            else:
                unpack_wheel(fetch_wheel(dist, python, args.platform or PLATFORMS, WHEELS), site)
        saved = strip_ray(site) if (site / "ray").is_dir() else 0
        this_package(site, scratch)
        if args.prepared:
            prepare_root(bundle / "outputs" / "default", args.prepared_overrides, scratch)
        (bundle / "benchmarks").mkdir()
        for name in ("gpu.py", "report.py"):
            shutil.copy2(REPO / "benchmarks" / name, bundle / "benchmarks" / name)
        shutil.copy2(REPO / "scripts" / "offline_run.sh", bundle / "offline_run.sh")
        manifest = {
            "python": python,
            "platform": "this machine's" if here else (args.platform or PLATFORMS)[0],
            "distributions": {n: d.version for n, d in sorted(dists.items())},
            "left_out": LEFT_OUT,
            "have": sorted(have),
            "prepared": args.prepared,
            "prepared_overrides": args.prepared_overrides if args.prepared else [],
            "ray_stripped_mb": round(saved / 1e6, 1),
            "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        preset = args.preset | (lzma.PRESET_EXTREME if args.preset == 9 else 0)
        with tarfile.open(partial, "w:xz", preset=preset) as tar:
            for path in sorted(bundle.iterdir()):
                tar.add(path, arcname=path.name)
        partial.replace(out)  # whole or absent: a stopped build leaves no half bundle under the name
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="", help="X.Y of the node's CPython (default: this interpreter's)")
    parser.add_argument("--platform", action="append", default=[], help=f"wheel platform tags (default {PLATFORMS})")
    parser.add_argument("--have", default=str(DEFAULT_HAVE), help="the node's distributions, one name per word")
    parser.add_argument("--out", default="", help="the bundle (default .cache/offline/tsgd-ray-offline-cpXY.tar.xz)")
    parser.add_argument("--prepared", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--preset", type=int, default=9, choices=range(10), help="xz preset (0: fast, 9: small)")
    parser.add_argument("prepared_overrides", nargs="*", metavar="key=value", help="for the prepared output root")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        out = build(args)
    except BundleError as exc:
        print(f"offline_bundle.py: error: {exc}", file=sys.stderr)
        return 2
    mb = out.stat().st_size / 1e6
    print(f"{out} ({time.time() - started:.0f} s)")
    print(f"target offline_bundle_mb: {mb:.1f} (goal <= {GOAL_MB}) {'met' if mb <= GOAL_MB else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
