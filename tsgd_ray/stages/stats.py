"""Statistics stage: one pass of the frozen teacher over the training clips.

Probe actors (`stats.actors`, each holding the teacher) take whole units from an `ElasticPool`:
the files of the training split's clip cache (decoded once, by prepare), or, with
data.clip_cache=false or stats.init_views > 1, the training shards, which they decode. They keep
per actor:

- a `ClassStatistics` of exact integer per-class sums of every BN layer's input moments, so the
  result is bit-identical whatever the shard order or actor count;
- per class, the MAX_IPC best init candidates by seeded random priority and by teacher loss, each
  named by (video id, cache file or shard, row); with `stats.init_views` > 1 the loss is the best of that many
  candidate views per clip, and the candidate names its view; then also `motion_window`: the
  seeded videos, each naming its view of the largest motion energy x teacher margin.

Each actor hands both over once at the end, and the driver folds them in as they arrive: it holds
the running sums and one actor's at a time (classes x BN channels x 16 B each, plus MAX_IPC
candidates per class), whatever the number of actors. The `init` stage then reads (or decodes)
the chosen candidates::

    <stats_dir>/statistics.pt, candidates.json, stats.json (marker: clips, bad videos, mean loss)
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.config import MAX_IPC, Compensation
from tsgd_ray.console import Progress
from tsgd_ray.core.augment import keyed_views
from tsgd_ray.core.bn_stats import BatchNormTaps, ClassStatistics, batchnorm_layers
from tsgd_ray.core.device import autocast, reserved_gpus, resolve_device, tune_for
from tsgd_ray.core.selection import BestPerClass, seeded_priority, window_score
from tsgd_ray.core.tsgf import motion_energy
from tsgd_ray.data import clip_cache
from tsgd_ray.data.node_cache import NodeCache
from tsgd_ray.data.pipeline import ClipDecoder, TooManyBadVideos
from tsgd_ray.data.shards import ManifestError, read_manifest, shards_root, train_shards
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.runtime.pool import ElasticPool, PoolActor, actor_starter
from tsgd_ray.settings import crop_settings, input_settings
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import OFF, RunContext

log = logging.getLogger(__name__)

#: candidates ranked by seeded priority, and by teacher loss; with stats.init_views > 1 also the
#: seeded videos' windows of the largest motion x margin
INIT_KINDS = ("real", "lowest_loss", "motion_window")


class StatsWorker(PoolActor):
    """A Ray actor holding the frozen teacher: whole units in, per-class sums and candidates kept.

    `probe(unit)` returns a small summary {clips, loss_sum, bad, decodes}; `collect()` hands over
    {"statistics": state dict, "candidates": {kind: BestPerClass}} and resets them.
    """

    def setup(self, cfg: DictConfig, classes: list[str], threads: int) -> None:
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.inputs = input_settings(cfg)
        self.crop = crop_settings(cfg.augment)
        self.compensate = Compensation(cfg.tsgf.compensate)
        self.device = resolve_device(cfg.device, cfg.stats.gpus_per_actor, "stats.gpus_per_actor")
        tune_for(self.device, cfg.stats.gpus_per_actor)
        self.teacher = artifacts.load_teacher(cfg, classes, self.device)
        self.num_classes = len(classes)
        self.decoder = ClipDecoder.from_config(cfg, threads=threads)
        self.channels = [m.num_features for m in batchnorm_layers(self.teacher)]
        self._reset()

    def _reset(self) -> None:
        self.stats = ClassStatistics.empty(self.num_classes, self.channels)
        kinds = INIT_KINDS if self.cfg.stats.init_views > 1 else INIT_KINDS[:2]
        self.best = {kind: BestPerClass(MAX_IPC) for kind in kinds}

    def probe(self, unit: dict) -> dict:
        """One unit of the pass: {"uri", "file"} a clip-cache file (read) or {"uri", "shard"} a
        training shard (decoded). Candidates are named by the unit's "file" or "shard" and the row."""
        clips, loss_sum, errors, decoded_before = 0, 0.0, [], self.decoder.decodes
        name = {k: unit[k] for k in ("file", "shard") if k in unit}
        for row, batch, columns in self._cached(unit["uri"]) if "file" in unit else self._decoded(unit["uri"]):
            ok = batch["ok"]
            errors.extend(str(e) for e in batch["error"][~ok])
            if ok.any():
                losses, scores = self._forward(batch["clip"][ok], batch["label"][ok], batch["video_id"][ok])
                view_losses, views, moving = self._best_views({k: v[ok] for k, v in columns.items()}, losses, scores)
                rows = row + np.flatnonzero(ok)
                for r, vid, label, loss, view_loss, view, window in zip(
                    rows, batch["video_id"][ok], batch["label"][ok], losses, view_losses, views, moving
                ):
                    entry = {"video_id": str(vid), **name, "row": int(r), "loss": float(loss)}
                    priority = seeded_priority(self.cfg.seed, str(vid))
                    self.best["real"].add(label, priority, entry)
                    self.best["lowest_loss"].add(
                        label, float(view_loss), {**entry, "loss": float(view_loss), "view": int(view)}
                    )
                    if "motion_window" in self.best:
                        self.best["motion_window"].add(label, priority, {**entry, "view": int(window)})
                clips += int(ok.sum())
                loss_sum += float(losses.sum())
        return {"clips": clips, "loss_sum": loss_sum, "bad": errors, "decodes": self.decoder.decodes - decoded_before}

    def _decoded(self, uri: str) -> Iterator[tuple[int, dict, dict]]:
        """(first row, ClipDecoder batch, the shard columns it came from) of a shard, decoded."""
        row = 0
        with storage.open_parquet(uri) as f:
            for batch in pq.ParquetFile(f).iter_batches(
                batch_size=self.cfg.stats.batch_size, columns=["video_id", "label", "video"]
            ):
                columns = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in ("video_id", "label", "video")}
                yield row, self.decoder(columns), columns
                row += len(columns["label"])

    def _cached(self, uri: str) -> Iterator[tuple[int, dict, dict]]:
        """The same of a clip-cache file, read (its clips decoded once, by prepare)."""
        table = clip_cache.read_file(uri, layout.clip_shape(self.cfg), NodeCache.for_config(self.cfg))
        n, step = len(table["label"]), self.cfg.stats.batch_size
        for start in range(0, n, step):
            end = min(n, start + step)
            batch = {
                "clip": table["clip"][start:end],
                "label": table["label"][start:end],
                "video_id": np.array(table["video_id"][start:end], dtype=object),
                "ok": np.ones(end - start, dtype=bool),
                "error": np.full(end - start, "", dtype=object),
            }
            yield start, batch, {}

    def _forward(self, clips: np.ndarray, labels: np.ndarray, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(teacher loss, window score) per clip, the clips' moments added to the class sums."""
        x = self.inputs.model_input(torch.from_numpy(np.ascontiguousarray(clips)).to(self.device))
        if self.cfg.stats.augment:
            x = keyed_views(x, [str(v) for v in video_ids], self.cfg.seed, self.crop)
        y = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        with torch.no_grad(), BatchNormTaps(self.teacher) as taps, autocast(self.device, self.inputs.amp):
            logits = self.teacher(x).float()
            self.stats.add(taps, y)
        return self._loss_and_score(logits, y, x)

    def _loss_and_score(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        loss = F.cross_entropy(logits, y, reduction="none").double().cpu().numpy()
        if "motion_window" not in self.best:  # no views to choose among: no frame differences on the read path
            return loss, np.zeros_like(loss)
        return loss, window_score(logits, y, motion_energy(x, self.compensate)).double().cpu().numpy()

    def _best_views(
        self, columns: dict, losses: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per clip, over the stats.init_views candidate views: the lowest teacher loss, its view,
        and the view of the largest window score. View 0 is the clip as sampled, with `losses` and
        `scores`; `columns`: the shard rows (empty when stats.init_views is 1). A view that fails to
        decode is not a candidate (the clip itself did decode); ties keep the earlier view."""
        best, views = losses.copy(), np.zeros(len(losses), dtype=np.int64)
        top, windows = scores.copy(), np.zeros(len(losses), dtype=np.int64)
        for view in range(1, self.cfg.stats.init_views):
            decoded = self.decoder({**columns, "view": np.full(len(losses), view)})
            ok = decoded["ok"]
            if not ok.any():
                continue
            x = self.inputs.model_input(torch.from_numpy(np.ascontiguousarray(decoded["clip"][ok])).to(self.device))
            y = torch.from_numpy(columns["label"][ok].astype(np.int64)).to(self.device)
            with torch.no_grad(), autocast(self.device, self.inputs.amp):
                loss, score = self._loss_and_score(self.teacher(x).float(), y, x)
            rows = np.flatnonzero(ok)
            lower, higher = loss < best[rows], score > top[rows]
            best[rows[lower]], views[rows[lower]] = loss[lower], view
            top[rows[higher]], windows[rows[higher]] = score[higher], view
        return best, views, windows

    def collect(self) -> dict:
        out = {"statistics": self.stats.state_dict(), "candidates": {k: b.trim() for k, b in self.best.items()}}
        self._reset()
        return out


def merge_states(a: dict, b: dict) -> dict:
    """Actor state `b` (`collect()`) folded into `a` in place, so the fold holds no third copy
    (exact: integer sums, candidates by key); returns `a`, which the caller must own."""
    ClassStatistics.from_state_dict(a["statistics"]).merge_(ClassStatistics.from_state_dict(b["statistics"]))
    for kind, best in b["candidates"].items():
        a["candidates"][kind].merge(best)
    return a


def units(cfg: DictConfig, manifest: dict) -> tuple[list[dict], dict | None]:
    """The pass's units and the clip cache they come from: its view-0 files ({"uri", "rows",
    "file"}), read, where data.clip_cache is on and stats.init_views is 1; else the training
    shards of the shard `manifest` ({"uri", "rows", "shard"}) and None, decoded (extra candidate
    views need the videos)."""
    if cfg.data.clip_cache and cfg.stats.init_views == 1:
        marker = clip_cache.ensure(cfg, "train")  # prepare built it; rebuilt only where it is gone
        files = marker["views"][0]["files"]
        return [
            {"uri": storage.join(marker["folder"], f["path"]), "rows": f["rows"], "file": f["path"]} for f in files
        ], marker
    return [{**shard, "shard": i} for i, shard in enumerate(train_shards(shards_root(cfg), manifest))], None


def _probe_pass(cfg: DictConfig, manifest: dict, stage: RunContext) -> dict:
    classes = manifest["classes"]
    work, cache = units(cfg, manifest)
    if not work:
        raise ManifestError(f"no training videos in the shards under {shards_root(cfg)}")
    done, state, lost = _probe(cfg, classes, work, "file" if cache else "shard")
    stats, best = ClassStatistics.from_state_dict(state["statistics"]), state["candidates"]
    missing = stats.missing_classes()
    if missing:
        raise TooManyBadVideos(f"classes with no decodable training clip: {[classes[c] for c in missing[:10]]}")
    artifacts.write_statistics(cfg, stats)
    candidates = {kind: kept.best(len(classes)) for kind, kept in best.items()}
    artifacts.write_candidates(cfg, candidates)
    clips = sum(r["clips"] for r in done.values())
    all_bad = cache["errors"] if cache else [e for s in sorted(done) for e in done[s]["bad"]]
    marker = {
        "clips": clips,
        "bad_videos": all_bad,  # a cache's: counted when prepare decoded them
        "classes": len(classes),
        "source": "clip_cache" if cache else "shards",
        "units": len(work),
        "decodes": sum(r["decodes"] for r in done.values()),
        "mean_teacher_loss": sum(r["loss_sum"] for r in done.values()) / max(clips, 1),
        "actors_lost": lost,
    }
    stage.log_metrics(
        {k: marker[k] for k in ("clips", "actors_lost", "mean_teacher_loss")} | {"bad_videos": len(all_bad)}
    )
    log.info(
        "stats: %d clips in %d %s, %d bad, %d decoded",
        clips,
        len(work),
        marker["source"],
        len(all_bad),
        marker["decodes"],
    )
    return marker


def _probe(cfg: DictConfig, classes: list[str], work: list[dict], unit: str) -> tuple[dict, dict, int]:
    """The probe over every unit of `work` on the stats actors: (each unit's result, the folded
    state, actors lost). Raises TooManyBadVideos as soon as more than data.max_bad_fraction fail."""
    expected = sum(u["rows"] for u in work)
    max_bad = int(cfg.data.max_bad_fraction * expected)
    bad: dict[int, list[str]] = {}
    progress = Progress("stats", len(work), unit)
    probed = 0  # clips of the finished units

    def on_result(unit: int, result: dict) -> None:
        nonlocal probed
        bad[unit] = result["bad"]
        probed += result["clips"]
        progress.update(len(bad), clips=probed)
        total = sum(map(len, bad.values()))
        if total > max_bad:
            examples = [e for errors in bad.values() for e in errors][:3]
            raise TooManyBadVideos(
                f"{total} of {expected} training videos failed to decode, more than "
                f"data.max_bad_fraction allows ({max_bad}); e.g. {examples}"
            )

    s = cfg.stats
    check_gpus(cfg, "stats.gpus_per_actor", s.gpus_per_actor)
    gpus = reserved_gpus(cfg.device, s.gpus_per_actor)
    start = actor_starter(StatsWorker, s.cpus_per_actor, gpus, cfg, classes, max(1, math.floor(s.cpus_per_actor)))
    pool = ElasticPool(start, s.actors, f"tsgd-stats-{os.getpid()}", cfg.ray.max_failures)
    done, state = pool.run(
        range(len(work)), lambda actor, i: actor.probe.remote(work[i]), on_result, collect="collect", fold=merge_states
    )
    return done, state, pool.lost


def run_stats(cfg: DictConfig, run: RunContext = OFF) -> dict:
    """The statistics pass, unless finished; returns its marker (its counts logged to a child
    "stats" of `run`).

    Raises:
        FileNotFoundError: no teacher yet. TooManyBadVideos: as the data pipeline, or a class with no
        decodable clip.
    """
    manifest = read_manifest(shards_root(cfg))
    return skeleton.run_stage(
        cfg,
        "stats",
        layout.of(cfg).stats_marker,
        lambda stage: _probe_pass(cfg, manifest, stage),
        run,
        {"method": cfg.distill.method.value},
    )
