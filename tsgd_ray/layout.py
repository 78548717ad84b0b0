"""The run layout: where every stage's output lives and what its files are called.

A stage's folder is named by a hash of exactly the settings its result depends on, chained to the
hash of the stage before it::

    <output_root>/teacher/<key>/    teacher.pt, teacher.json (marker), ray_train/ (checkpoints)
    <output_root>/stats/<key>/      statistics.pt, candidates.json, stats.json (marker)
        init/<n>-<kind>[-draw<d>]/  part-00000.parquet ... (clip tables), init.json (marker)
    <output_root>/distill/<key>/    plan.json, partitions/p00000.json (marker per partition)
        synthetic/                  p00000.parquet ... (clip tables, written by the distill actors),
                                    manifest.json (merge's marker), previews/grid.mp4
    <output_root>/evaluate/<key>/   seed-00000.json, results.json (marker),
                                    checkpoints/seed-00000/epoch-00029.pt (a student's latest two)
    <output_root>/fleet/<key>/      slot-0/ ... (the evaluation fleet's Ray Train runs)

So a rerun of the same config finds its finished stages and skips them, and two runs that differ
in one key share every stage upstream of it. The statistics depend on the teacher, the data and
the seed only: an IPC sweep shares them, and each (init clips per class n, init kind) gets its
own init folder (and each init draw other than the first, distill.draw, its own too).
Settings that change only how fast or where work runs (schema fields marked execution_only) are
left out of the keys. Every function here is pure: it names, it never reads or writes.
`of(cfg, method)` hashes the keys once; a stage takes its Layout at its start and hands it down.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from tsgd_ray import methods, storage
from tsgd_ray.config import PACK, InitKind, Method, keys_where, to_dict
from tsgd_ray.storage import OutputRoot

EXECUTION_ONLY = frozenset(keys_where("execution_only"))
#: sections that `methods.method_config` folds into others (evaluate.full into evaluate.* for the
#: `full` method): keyed by what they become, so they do not re-key the other methods
FOLDED = frozenset({"evaluate.full"})
#: keys named by a folder instead of hashed: distill.draw by the init folder's name, so a draw
#: other than 0 re-keys init and the stages after it, and draw 0 keeps the keys it always had
NAMED = frozenset({"distill.draw"})

KEY_LENGTH = 16

TEACHER, TEACHER_MARKER = "teacher.pt", "teacher.json"
STATISTICS, CANDIDATES, STATS_MARKER = "statistics.pt", "candidates.json", "stats.json"
INIT_MARKER = "init.json"
DISTILL_MARKER = "distill.json"
PLAN = "plan.json"
SYNTHETIC_MANIFEST, PREVIEW = "manifest.json", "previews/grid.mp4"
RESULTS = "results.json"


def _key(parent: str, data: dict[str, Any], sections: tuple[str, ...]) -> str:
    """The hash of `parent` and `sections` of the config as a dict, less what does not key a stage."""
    settings = {}
    for name in sections:
        value = data[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{name}.{k}" not in EXECUTION_ONLY | FOLDED | NAMED}
        settings[name] = value
    text = json.dumps({"parent": parent, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def init_kind(cfg: DictConfig) -> InitKind:
    """Which real clips this config starts from: `noise` init records the seeded real clips
    (random_real's set), so it shares them with `real`."""
    return InitKind.real if cfg.distill.init == InitKind.noise else InitKind(cfg.distill.init)


def init_per_class(cfg: DictConfig) -> int:
    """Init clips per class: distill.ipc, or PACK times that under distill.pack (the first of the
    same seeded candidates, so a packed run at IPC n shares the init of an unpacked one at 4n)."""
    return cfg.distill.ipc * (PACK if cfg.distill.pack else 1)


def init_offset(cfg: DictConfig) -> int:
    """Where distill.draw's init clips start in each class's candidates: draw x PACK x distill.ipc,
    packed or not, so a draw of random_real is the first IPC of the same draw of packed_real."""
    return cfg.distill.draw * PACK * cfg.distill.ipc


def init_name(cfg: DictConfig) -> str:
    draw = f"-draw{cfg.distill.draw}" if cfg.distill.draw else ""
    return f"{init_per_class(cfg)}-{init_kind(cfg).value}{draw}"


@dataclass(frozen=True)
class Layout:
    """Every folder of one run of a config (and of a method: `evaluate`, "" without one), each
    stage's key hashed once (`of`). Folders and files are URIs under storage.output_root."""

    teacher: str
    stats: str
    init: str
    distill: str
    evaluate: str = ""

    @property
    def teacher_file(self) -> str:
        return storage.join(self.teacher, TEACHER)

    @property
    def teacher_marker(self) -> str:
        return storage.join(self.teacher, TEACHER_MARKER)

    @property
    def stats_marker(self) -> str:
        return storage.join(self.stats, STATS_MARKER)

    @property
    def init_marker(self) -> str:
        return storage.join(self.init, INIT_MARKER)

    @property
    def distill_marker(self) -> str:
        return storage.join(self.distill, DISTILL_MARKER)

    @property
    def synthetic_manifest(self) -> str:
        return storage.join(self.synthetic, SYNTHETIC_MANIFEST)

    @property
    def synthetic(self) -> str:
        return storage.join(self.distill, "synthetic")

    @property
    def plan(self) -> str:
        return storage.join(self.distill, PLAN)

    @property
    def results(self) -> str:
        return storage.join(self._evaluate(), RESULTS)

    def init_part(self, part: int) -> str:
        return storage.join(self.init, f"part-{part:05d}.parquet")

    def partition_marker(self, partition_id: int) -> str:
        return storage.join(self.distill, "partitions", partition_name(partition_id) + ".json")

    def seed(self, seed: int) -> str:
        return storage.join(self._evaluate(), f"seed-{seed:05d}.json")

    def student_checkpoints(self, seed: int) -> str:
        """The folder of one student's checkpoints (`runtime.ray_train.save_state`)."""
        return storage.join(self._evaluate(), "checkpoints", f"seed-{seed:05d}")

    def _evaluate(self) -> str:
        if not self.evaluate:
            raise ValueError("this layout was made without a method: layout.of(cfg, method)")
        return self.evaluate


#: the sections a synthetic set's key hashes (beside its statistics and init clips)
_SET = ("amp", "augment", "tsgf", "distill")


def keys(cfg: DictConfig, method: Optional[Method] = None) -> dict[str, str]:
    """Each stage's key ("teacher", "stats", "distill", and "evaluate" with a method), chained:
    the config turned into a dict once."""
    data = to_dict(cfg)
    if cfg.teacher.checkpoint:  # an imported teacher is named by its file, not by training settings
        teacher = _key(cfg.teacher.checkpoint, data, ("data",))
    else:
        teacher = _key("", data, ("seed", "amp", "data", "augment", "teacher"))
    stats = _key(teacher, data, ("seed", "stats"))
    out = {"teacher": teacher, "stats": stats, "distill": _key(f"{stats}/{init_name(cfg)}", data, _SET)}
    if method is not None:
        parent = out["distill"] if methods.get(method).distils else teacher
        out["evaluate"] = _key(parent, data, ("amp", "augment", "tsgf", "evaluate")) + f"-{method.value}"
    return out


def of(cfg: DictConfig, method: Optional[Method] = None) -> Layout:
    """The layout of cfg's run (of `method`'s, where given: its evaluate folder)."""
    k = keys(cfg, method)
    root = OutputRoot(cfg.storage.output_root)
    stats = root.uri("stats", k["stats"])
    return Layout(
        teacher=root.uri("teacher", k["teacher"]),
        stats=stats,
        init=storage.join(stats, "init", init_name(cfg)),
        distill=root.uri("distill", k["distill"]),
        evaluate=root.uri("evaluate", k["evaluate"]) if method is not None else "",
    )


def clip_size(cfg: DictConfig) -> tuple[int, int, int]:
    return cfg.data.num_frames, cfg.data.height, cfg.data.width


def clip_shape(cfg: DictConfig) -> tuple[int, int, int, int]:
    return (*clip_size(cfg), 3)


def partition_name(partition_id: int) -> str:
    return f"p{partition_id:05d}"


def partition_file(partition_id: int) -> str:
    """The synthetic file of a partition, relative to the synthetic folder."""
    return partition_name(partition_id) + ".parquet"


def fleet_dir(cfg: DictConfig, students: list[str]) -> str:
    """Where the evaluation fleet of these students (their seed files' URIs) keeps its Ray Train
    runs: the same students, the same folder."""
    digest = hashlib.sha256(json.dumps(sorted(students)).encode()).hexdigest()[:KEY_LENGTH]
    return OutputRoot(cfg.storage.output_root).uri("fleet", digest)
