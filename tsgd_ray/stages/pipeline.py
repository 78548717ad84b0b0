"""The whole pipeline, or some of its stages, for the run's method and its baselines.

prepare (shards, then every clip decoded once) -> teacher -> for each method in [distill.method, *evaluate.baselines]: (stats -> init ->
distill -> merge, for the methods that distil) -> evaluate, every method's students one fleet.
Every stage skips what is finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

from omegaconf import DictConfig

from tsgd_ray import methods, storage
from tsgd_ray.config import Method
from tsgd_ray.data import clip_cache
from tsgd_ray.data.catalogs import Catalog, build_catalog
from tsgd_ray.data.shards import MANIFEST, eval_split, finished_manifest, read_manifest, shards_root
from tsgd_ray.methods import method_config
from tsgd_ray.plan import make_plan, render
from tsgd_ray.stages.distill import run_distill
from tsgd_ray.stages.evaluate import evaluate_methods, run_evaluate
from tsgd_ray.stages.init import run_init
from tsgd_ray.stages.merge import run_merge
from tsgd_ray.stages.prepare import decode_once, run_prepare
from tsgd_ray.stages.stats import run_stats
from tsgd_ray.stages.teacher import run_teacher
from tsgd_ray.tracking.runs import OFF, RunContext, check_store

log = logging.getLogger(__name__)

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
    """Run `stages` (in pipeline order) for every method; returns the evaluation results (if run).
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
    order = methods.run_order(cfg)
    for method in order:
        run_method(cfg, method, [s for s in stages if s != "evaluate"], run)
    results = evaluate_methods(cfg, order, run) if "evaluate" in stages else []
    if run and results:
        _log_results(run, order, results)
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


def _log_results(run: RunContext, order: list[Method], results: list[dict]) -> None:
    """Each method's top-1/top-5 mean and std, the teacher's, and the results table."""
    for method, result in zip(order, results):
        run.log_metrics({f"{method.value}/{k}": result[k] for k in ("top1_mean", "top1_std", "top5_mean", "top5_std")})
    teacher = {f"teacher/{k}": results[0][f"teacher_{k}"] for k in ("top1", "top5") if f"teacher_{k}" in results[0]}
    run.log_metrics(teacher)  # one teacher for every method
    run.log_table("results.json", results_rows(results))
    run.log_text("results.md", results_table(results) + "\n")


def run_method(cfg: DictConfig, method: Method, stages=STAGES, run: RunContext = OFF) -> Optional[dict]:
    """The per-method stages of `stages` for `method` (stats, init, distill, merge where it
    distils; evaluate); returns the evaluation results, or None when evaluate is not among them."""
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


def results_rows(results: list[dict]) -> list[dict]:
    """One row per method: method, IPC, top-1/top-5 mean and std and the teacher's (in %)."""
    return [
        {
            "method": r["method"],
            "ipc": r["ipc"] or 0,
            "seeds": len(r["seeds"]),
            **{f"{k}_{s}": round(100 * r[f"{k}_{s}"], 2) for k in ("top1", "top5") for s in ("mean", "std")},
            "teacher_top1": round(100 * r.get("teacher_top1", float("nan")), 2),
        }
        for r in results
    ]


def results_table(results: list[dict]) -> str:
    """A Markdown table: method, IPC, top-1 and top-5 (mean +- std over seeds, in %)."""
    lines = ["| method | IPC | top-1 % | top-5 % | seeds |", "|---|---|---|---|---|"]
    for r in results:
        ipc = "all" if r["ipc"] is None else str(r["ipc"])
        lines.append(
            f"| {r['method']} | {ipc} | {100 * r['top1_mean']:.1f} +- {100 * r['top1_std']:.1f} | "
            f"{100 * r['top5_mean']:.1f} +- {100 * r['top5_std']:.1f} | {len(r['seeds'])} |"
        )
    return "\n".join(lines)
