"""The whole pipeline, or some of its stages, for the run's method and its baselines.

prepare (shards, then every clip decoded once) -> teacher -> for the sets of every arm (each method
in [distill.method, *evaluate.baselines] that distils, and each of its init draws): stats -> init
-> distill (every set's partitions on one actor pool) -> merge; then evaluate, every arm's
students one fleet.
Every stage skips what is finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from typing import Optional

from omegaconf import DictConfig

from tsgd_ray import methods, storage
from tsgd_ray.config import Method
from tsgd_ray.data import clip_cache
from tsgd_ray.data.catalogs import Catalog, build_catalog
from tsgd_ray.data.shards import MANIFEST, eval_split, finished_manifest, read_manifest, shards_root
from tsgd_ray.methods import method_config
from tsgd_ray.plan import make_plan, render
from tsgd_ray.stages.distill import distill_sets, run_distill
from tsgd_ray.stages.evaluate import evaluate_methods, run_evaluate
from tsgd_ray.stages.init import run_init
from tsgd_ray.stages.merge import run_merge
from tsgd_ray.stages.prepare import decode_once, run_prepare
from tsgd_ray.stages.stats import run_stats
from tsgd_ray.stages.teacher import run_teacher
from tsgd_ray.tracking.runs import OFF, RunContext, check_store

log = logging.getLogger(__name__)

#: draws a paired difference needs before it can separate two methods
MIN_DRAWS = 3

STAGES = ("prepare", "teacher", "stats", "init", "distill", "merge", "evaluate")


def preflight(cfg: DictConfig, stages=STAGES) -> Optional[Catalog]:
    """Checks that need no Ray, before any: with evaluate among `stages`, that the dataset has the
    evaluation split (from the finished shard manifest, else from the catalog, which is returned
    so that prepare does not list the dataset again).

    Raises:
        ConfigError: no data.eval_split split; a cluster job keeping MLflow's store in a local
        file while its output root is in object storage (`check_store`). CatalogError,
        ManifestError: as prepare.
    """
    check_store(cfg)
    manifest = finished_manifest(cfg)
    catalog = None
    if manifest is None and "prepare" in stages:
        catalog = build_catalog(cfg)
        splits = {r.split for r in catalog.records}
    else:
        splits = set(read_manifest(shards_root(cfg))["counts"]) if manifest is None else set(manifest["counts"])
    if "evaluate" in stages:
        eval_split(cfg, splits)
    return catalog


def run_stages(cfg: DictConfig, stages=STAGES, run: RunContext = OFF, catalog: Optional[Catalog] = None) -> list[dict]:
    """Run `stages` (in pipeline order) for every arm (`methods.arms`: each method, and each of its
    init draws where it distils); returns each arm's evaluation results (if run, see
    `evaluate_methods`; `by_method` pools them).
    Each stage logs to a child of `run` (the invocation's); the dataset, the teacher and the
    results are logged to `run` here. `catalog`: the dataset's catalog when the caller has built it
    (see `preflight`). The plan (`tsgd-ray plan`'s, with the shard manifest's counts) is rendered
    once the shards exist, before the teacher: to the log file, its total to the console, and to
    `run` as plan.txt.

    Raises:
        ConfigError: when evaluate is asked for and the dataset has no data.eval_split split.
    """
    if "prepare" in stages:
        run_prepare(cfg, catalog)
        caches = decode_once(cfg)
        run.log_metrics({f"decodes/{s}": clip_cache.decodes(m) for s, m in caches.items()})
    if "evaluate" in stages:
        eval_split(cfg, read_manifest(shards_root(cfg))["counts"])
    plan = render(make_plan(cfg))
    logging.getLogger("plan").info("%s", plan)  # the log file only
    log.info("%s", plan.splitlines()[-1])
    if run:
        _log_dataset(cfg, run)
        run.log_text("plan.txt", plan + "\n")
    if "teacher" in stages:
        run.set_tags({"teacher_sha256": run_teacher(cfg, run)["sha256"]})
    arms = methods.arms(cfg)
    sets = [method_config(cfg, m, d) for m, d in arms if methods.get(m).distils]
    for stage, run_stage in (("stats", run_stats), ("init", run_init)):
        for set_cfg in sets if stage in stages else []:
            run_stage(set_cfg, run)
    if "distill" in stages and sets:
        distill_sets(sets, run)  # one actor pool for every set
    for set_cfg in sets if "merge" in stages else []:
        run_merge(set_cfg, run)
    results = evaluate_methods(cfg, arms, run) if "evaluate" in stages else []
    if run and results:
        _log_results(run, results)
    return results


def _log_dataset(cfg: DictConfig, run: RunContext) -> None:
    """The shard manifest as the run's input dataset (its sha256 a tag, the file an artifact)."""
    manifest = storage.read_bytes(storage.join(shards_root(cfg), MANIFEST))
    digest = hashlib.sha256(manifest).hexdigest()
    run.set_tags({"dataset_manifest_sha256": digest})
    run.log_text("shards/manifest.json", manifest.decode())
    parsed = json.loads(manifest)
    profile = {"classes": len(parsed["classes"])} | {
        f"{split}_videos": sum(c.values()) for split, c in parsed["counts"].items()
    }
    run.log_dataset(f"{cfg.data.dataset.value}-shards", digest, shards_root(cfg), profile, "train")


def _log_results(run: RunContext, results: list[dict]) -> None:
    """Each method's top-1/top-5 mean and std over its students, its paired difference from
    distill.method and that difference's SE, the teacher's, and the results table."""
    for m in by_method(results):
        metrics = {f"{m['method']}/{k}": m[k] for k in ("top1_mean", "top1_std", "top5_mean", "top5_std")}
        d = m["difference"]
        if d and d["se"] is not None:
            metrics.update({f"{m['method']}/difference": d["mean"], f"{m['method']}/difference_se": d["se"]})
        run.log_metrics(metrics)
    teacher = {f"teacher/{k}": results[0][f"teacher_{k}"] for k in ("top1", "top5") if f"teacher_{k}" in results[0]}
    run.log_metrics(teacher)  # one teacher for every method
    run.log_table("results.json", results_rows(results))
    run.log_text("results.md", results_table(results) + "\n")


def run_method(cfg: DictConfig, method: Method, stages=STAGES, run: RunContext = OFF) -> Optional[dict]:
    """The per-method stages of `stages` for `method` from cfg's init draw: stats, init, distill,
    merge where it distils; evaluate. Returns the evaluation results, or None when evaluate is not
    among them."""
    method_cfg = method_config(cfg, method)
    if methods.get(method).distils:
        for stage, run_stage in (
            ("stats", run_stats),
            ("init", run_init),
            ("distill", run_distill),
            ("merge", run_merge),
        ):
            if stage in stages:
                run_stage(method_cfg, run)
    return run_evaluate(method_cfg, method, run) if "evaluate" in stages else None


def by_method(results: list[dict]) -> list[dict]:
    """The arms' results pooled per method, in run order: top-1/top-5 mean and sample std over
    every student of every draw, "draws" (the draws' numbers), "seeds" (students per draw), the
    teacher's top-1/top-5 where tested, and "difference": for a distilling method after the first
    (distill.method), the paired difference of top-1 (first minus this method: per shared draw,
    the mean over seeds of each, then the mean over draws) with "se" (its standard error over
    draws; None for one draw) and "draws"; None for the first and for a method that does not
    distil (it does not depend on the draw)."""
    methods_in_order = list(dict.fromkeys(r["method"] for r in results))
    arms = {m: [r for r in results if r["method"] == m] for m in methods_in_order}
    first = {r["draw"]: r for r in arms[methods_in_order[0]]}
    pooled = []
    for m in methods_in_order:
        rows = arms[m]
        out = {"method": m, "ipc": rows[0]["ipc"], "draws": [r["draw"] for r in rows], "seeds": len(rows[0]["seeds"])}
        for k in ("top1", "top5"):
            values = [v for r in rows for v in r[k]]
            out[f"{k}_mean"] = statistics.fmean(values)
            out[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            if f"teacher_{k}" in rows[0]:
                out[f"teacher_{k}"] = rows[0][f"teacher_{k}"]
        shared = [r for r in rows if r["draw"] in first]
        out["difference"] = None
        if m != methods_in_order[0] and rows[0]["ipc"] is not None and shared:
            gaps = [first[r["draw"]]["top1_mean"] - r["top1_mean"] for r in shared]
            se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
            out["difference"] = {"mean": statistics.fmean(gaps), "se": se, "draws": len(gaps)}
        pooled.append(out)
    return pooled


def verdict(difference: Optional[dict]) -> str:
    """What a paired difference says: separated (more than 2 SE from 0, over >= 3 draws), not
    separated, or too few draws to tell."""
    if difference is None:
        return ""
    if difference["draws"] < MIN_DRAWS:
        return f"too few draws to separate (evaluate.draws >= {MIN_DRAWS})"
    return "separated" if abs(difference["mean"]) > 2 * difference["se"] else "not separated (within 2 SE)"


def results_rows(results: list[dict]) -> list[dict]:
    """One row per method (`by_method`): method, IPC, draws, seeds, top-1/top-5 mean and std, the
    paired difference from distill.method and its SE, and the teacher's top-1 (in %)."""
    rows = []
    for m in by_method(results):
        d = m["difference"] or {}
        rows.append(
            {
                "method": m["method"],
                "ipc": m["ipc"] or 0,
                "draws": len(m["draws"]),
                "seeds": m["seeds"],
                **{f"{k}_{s}": round(100 * m[f"{k}_{s}"], 2) for k in ("top1", "top5") for s in ("mean", "std")},
                "difference": round(100 * d["mean"], 2) if d else float("nan"),
                "difference_se": round(100 * d["se"], 2) if d.get("se") is not None else float("nan"),
                "teacher_top1": round(100 * m.get("teacher_top1", float("nan")), 2),
            }
        )
    return rows


def results_table(results: list[dict]) -> str:
    """A Markdown table, one row per method (`by_method`): IPC, top-1 and top-5 (mean +- std over
    students, in %), draws x seeds, and each baseline's paired difference from distill.method in
    top-1 points (+- its SE over draws) with `verdict`."""
    pooled = by_method(results)
    first = pooled[0]["method"]
    lines = [
        f"| method | IPC | top-1 % | top-5 % | draws x seeds | {first} - method, top-1 points (paired; SE over draws) |",
        "|---|---|---|---|---|---|",
    ]
    for m in pooled:
        ipc = "all" if m["ipc"] is None else str(m["ipc"])
        d = m["difference"]
        if m["ipc"] is None:
            gap = "(every real clip: not paired)"
        elif d is None:
            gap = ""
        else:
            se = f" +- {100 * d['se']:.1f}" if d["se"] is not None else ""
            gap = f"{100 * d['mean']:+.1f}{se}: {verdict(d)}"
        lines.append(
            f"| {m['method']} | {ipc} | {100 * m['top1_mean']:.1f} +- {100 * m['top1_std']:.1f} | "
            f"{100 * m['top5_mean']:.1f} +- {100 * m['top5_std']:.1f} | {len(m['draws'])} x {m['seeds']} | {gap} |"
        )
    return "\n".join(lines)
