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
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

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


def _settings(cfg: DictConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    data = to_dict(cfg)
    out = {}
    for name in sections:
        value = data[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{name}.{k}" not in EXECUTION_ONLY | FOLDED | NAMED}
        out[name] = value
    return out


def _key(parent: str, cfg: DictConfig, sections: tuple[str, ...]) -> str:
    text = json.dumps({"parent": parent, **_settings(cfg, sections)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def teacher_key(cfg: DictConfig) -> str:
    if cfg.teacher.checkpoint:  # an imported teacher is named by its file, not by training settings
        return _key(cfg.teacher.checkpoint, cfg, ("data",))
    return _key("", cfg, ("seed", "amp", "data", "augment", "teacher"))


def stats_key(cfg: DictConfig) -> str:
    return _key(teacher_key(cfg), cfg, ("seed", "stats"))


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


def distill_key(cfg: DictConfig) -> str:
    return _key(f"{stats_key(cfg)}/{init_name(cfg)}", cfg, ("amp", "augment", "tsgf", "distill"))


def evaluate_key(cfg: DictConfig, method: Method) -> str:
    parent = distill_key(cfg) if methods.get(method).distils else teacher_key(cfg)
    return _key(parent, cfg, ("amp", "augment", "tsgf", "evaluate")) + f"-{method.value}"


def teacher_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("teacher", teacher_key(cfg))


def stats_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("stats", stats_key(cfg))


def init_dir(cfg: DictConfig) -> str:
    return storage.join(stats_dir(cfg), "init", init_name(cfg))


def distill_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("distill", distill_key(cfg))


def synthetic_dir(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), "synthetic")


def evaluate_dir(cfg: DictConfig, method: Method) -> str:
    return OutputRoot(cfg.storage.output_root).uri("evaluate", evaluate_key(cfg, method))


def teacher_uri(cfg: DictConfig) -> str:
    return storage.join(teacher_dir(cfg), TEACHER)


def clip_size(cfg: DictConfig) -> tuple[int, int, int]:
    return cfg.data.num_frames, cfg.data.height, cfg.data.width


def clip_shape(cfg: DictConfig) -> tuple[int, int, int, int]:
    return (*clip_size(cfg), 3)


def init_part_uri(cfg: DictConfig, part: int) -> str:
    return storage.join(init_dir(cfg), f"part-{part:05d}.parquet")


def plan_uri(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), PLAN)


def partition_name(partition_id: int) -> str:
    return f"p{partition_id:05d}"


def partition_marker_uri(cfg: DictConfig, partition_id: int) -> str:
    return storage.join(distill_dir(cfg), "partitions", partition_name(partition_id) + ".json")


def partition_file(partition_id: int) -> str:
    """The synthetic file of a partition, relative to the synthetic folder."""
    return partition_name(partition_id) + ".parquet"


def seed_uri(cfg: DictConfig, method: Method, seed: int) -> str:
    return storage.join(evaluate_dir(cfg, method), f"seed-{seed:05d}.json")


def results_uri(cfg: DictConfig, method: Method) -> str:
    return storage.join(evaluate_dir(cfg, method), RESULTS)


def student_checkpoints(cfg: DictConfig, method: Method, seed: int) -> str:
    """The folder of one student's checkpoints (`runtime.ray_train.save_state`)."""
    return storage.join(evaluate_dir(cfg, method), "checkpoints", f"seed-{seed:05d}")


def fleet_dir(cfg: DictConfig, students: list[str]) -> str:
    """Where the evaluation fleet of these students (their seed files' URIs) keeps its Ray Train
    runs: the same students, the same folder."""
    digest = hashlib.sha256(json.dumps(sorted(students)).encode()).hexdigest()[:KEY_LENGTH]
    return OutputRoot(cfg.storage.output_root).uri("fleet", digest)
