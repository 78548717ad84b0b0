"""Statistics stage: one streaming pass of the frozen teacher over the training shards.

``clips (Ray Data) -> TeacherProbe actors -> per clip: CE loss + per-sample BN input moments``

The driver folds the moments into a `ClassStatistics` (integer fixed point: the result is
bit-identical whatever the block order or actor count), picks the IPC init clips per class
(distill.init: seeded random, or lowest teacher loss), decodes just those clips, and writes, once::

    <stats_dir>/statistics.pt   ClassStatistics.state_dict()
    <stats_dir>/init.pt         clips (N, F, H, W, 3) uint8, labels, indices (N,), video_ids
    <stats_dir>/stats.json      the completion marker (counts, bad videos, mean loss)
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import InitKind
from tsgd_ray.core import selection
from tsgd_ray.core.bn_stats import BatchNormTaps, ClassStatistics
from tsgd_ray.core.clips import to_model_input
from tsgd_ray.core.device import autocast, resolve_device
from tsgd_ray.data.pipeline import TooManyBadVideos, clip_dataset, expected_rows
from tsgd_ray.data.prepare import shards_root
from tsgd_ray.data.shards import read_manifest
from tsgd_ray.distributed.layout import read_tensors, stats_dir, write_tensors
from tsgd_ray.distributed.teacher import load_teacher

log = logging.getLogger(__name__)

STATISTICS = "statistics.pt"
INIT = "init.pt"
MARKER = "stats.json"


class TeacherProbe:
    """A Ray Data callable class holding the frozen teacher: clip rows -> loss and BN moments.

    Output columns: video_id, label, ok, error (passed through), loss (N,) float64 (CE of the
    un-augmented clip), means and squares (N, sum_l C_l) float32 (per-sample channel moments of
    every BN layer's input, layers concatenated). Bad rows get zeros.
    """

    def __init__(self, cfg: DictConfig, classes: list[str]):
        torch.set_num_threads(1)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.teacher = load_teacher(cfg, classes, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        n = len(ok)
        out = {k: batch[k] for k in ("video_id", "label", "ok", "error")}
        loss = np.zeros(n, dtype=np.float64)
        means = squares = None
        if ok.any():
            clips = torch.from_numpy(np.ascontiguousarray(batch["clip"][ok])).to(self.device)
            labels = torch.from_numpy(batch["label"][ok]).long().to(self.device)
            x = to_model_input(clips, self.cfg.data.mean, self.cfg.data.std)
            with torch.no_grad(), BatchNormTaps(self.teacher) as taps, autocast(self.device, self.cfg.amp):
                logits = self.teacher(x).float()
            loss[ok] = F.cross_entropy(logits, labels, reduction="none").double().cpu().numpy()
            good_means = torch.cat(taps.means, dim=1).cpu().numpy()
            good_squares = torch.cat(taps.squares, dim=1).cpu().numpy()
            means = np.zeros((n, good_means.shape[1]), dtype=np.float32)
            squares = np.zeros_like(means)
            means[ok], squares[ok] = good_means, good_squares
        out["loss"] = loss
        out["means"] = means if means is not None else np.zeros((n, 0), dtype=np.float32)
        out["squares"] = squares if squares is not None else np.zeros((n, 0), dtype=np.float32)
        return out


def _probe_pass(cfg: DictConfig, classes: list[str]) -> tuple[ClassStatistics, list[str], np.ndarray, np.ndarray, list[str]]:
    """Run the teacher over every training clip. Returns (statistics, video ids, labels, losses, bad)."""
    import ray

    stats = ClassStatistics.for_model(load_teacher(cfg, classes), len(classes))
    splits = np.cumsum([s.shape[1] for s in stats.sums])[:-1]
    probes = clip_dataset(cfg, "train").map_batches(
        TeacherProbe, fn_constructor_kwargs={"cfg": cfg, "classes": classes}, batch_size=cfg.data.decode_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.distill.actors), num_cpus=cfg.distill.cpus_per_actor,
        num_gpus=cfg.distill.gpus_per_actor or None)
    expected = expected_rows(cfg, "train")
    max_bad = int(cfg.data.max_bad_fraction * expected)
    video_ids, labels, losses, bad = [], [], [], []
    for batch in probes.iter_batches(batch_size=256, batch_format="numpy"):
        ok = batch["ok"].astype(bool)
        bad.extend(str(e) for e in batch["error"][~ok])
        if len(bad) > max_bad:
            raise TooManyBadVideos(f"{len(bad)} of {expected} training videos failed to decode, more than "
                                   f"data.max_bad_fraction allows ({max_bad}); e.g. {bad[:3]}")
        if not ok.any():
            continue
        good_labels = torch.from_numpy(batch["label"][ok].astype(np.int64))
        means = np.split(batch["means"][ok], splits, axis=1)
        squares = np.split(batch["squares"][ok], splits, axis=1)
        stats.add_moments([torch.from_numpy(m) for m in means], [torch.from_numpy(s) for s in squares], good_labels)
        video_ids.extend(str(v) for v in batch["video_id"][ok])
        labels.append(batch["label"][ok].astype(np.int64))
        losses.append(batch["loss"][ok])
    return stats, video_ids, np.concatenate(labels), np.concatenate(losses), bad


def choose_init(cfg: DictConfig, video_ids: list[str], labels: np.ndarray, losses: np.ndarray, num_classes: int) -> dict[int, list[str]]:
    """Per class, the video ids of its `distill.ipc` init clips, in index order.

    Rows are put in video-id order first, so the choice does not depend on the stream's order.
    `noise` init still records seeded real clips (they are the random_real baseline's set).
    """
    order = np.argsort(np.asarray(video_ids), kind="stable")
    ids = [video_ids[i] for i in order]
    labels_t = torch.from_numpy(labels[order])
    if cfg.distill.init == InitKind.lowest_loss:
        choice = selection.lowest_loss(torch.from_numpy(losses[order]), labels_t, num_classes, cfg.distill.ipc)
    else:
        choice = selection.random_real(labels_t, num_classes, cfg.distill.ipc, cfg.seed)
    return {c: [ids[row] for row in rows] for c, rows in choice.items()}


def _decode_chosen(cfg: DictConfig, chosen: dict[int, list[str]]) -> dict:
    wanted = {vid: (c, i) for c, ids in chosen.items() for i, vid in enumerate(ids)}
    rows = clip_dataset(cfg, "train", video_ids=list(wanted)).take_all()
    found = {str(r["video_id"]): r for r in rows if r["ok"]}
    order = sorted(wanted, key=lambda v: wanted[v])
    missing = [v for v in order if v not in found]
    if missing:
        raise TooManyBadVideos(f"init clips could not be decoded again: {missing[:5]}")
    return {"clips": torch.from_numpy(np.stack([found[v]["clip"] for v in order])),
            "labels": torch.tensor([wanted[v][0] for v in order]),
            "indices": torch.tensor([wanted[v][1] for v in order]),
            "video_ids": order}


def load_statistics(cfg: DictConfig) -> ClassStatistics:
    return ClassStatistics.from_state_dict(read_tensors(storage.join(stats_dir(cfg), STATISTICS)))


def load_init(cfg: DictConfig) -> dict:
    """{"clips": (N, F, H, W, 3) uint8, "labels": (N,), "indices": (N,), "video_ids": [N]}."""
    return read_tensors(storage.join(stats_dir(cfg), INIT))


def run_stats(cfg: DictConfig, tracker=None) -> dict:
    """Compute and write the class statistics and init clips unless finished; returns the marker.

    Raises:
        FileNotFoundError: no teacher yet. TooManyBadVideos: as the data pipeline.
        ValueError: a class with fewer than distill.ipc clips.
    """
    folder = stats_dir(cfg)
    marker_uri = storage.join(folder, MARKER)
    if storage.exists(marker_uri):
        log.info("stats: finished at %s, skipped", folder)
        return {**storage.read_json(marker_uri), "skipped": True}
    started = time.time()
    classes = read_manifest(shards_root(cfg))["classes"]
    stats, video_ids, labels, losses, bad = _probe_pass(cfg, classes)
    missing = stats.missing_classes()
    if missing:
        raise ValueError(f"classes with no decodable training clip: {[classes[c] for c in missing[:10]]}")
    init = _decode_chosen(cfg, choose_init(cfg, video_ids, labels, losses, len(classes)))
    write_tensors(storage.join(folder, STATISTICS), stats.state_dict())
    write_tensors(storage.join(folder, INIT), init)
    marker = {"clips": len(video_ids), "bad_videos": bad, "classes": len(classes), "init": cfg.distill.init.value,
              "ipc": cfg.distill.ipc, "mean_teacher_loss": float(losses.mean()),
              "init_video_ids": init["video_ids"], "seconds": round(time.time() - started, 1)}
    storage.write_json_once(marker_uri, marker)
    if tracker:
        run_id = tracker.child("stats", tags={"method": cfg.distill.method.value})
        tracker.log_metrics(run_id, {"clips": len(video_ids), "bad_videos": len(bad),
                                     "mean_teacher_loss": marker["mean_teacher_loss"], "seconds": marker["seconds"]})
        tracker.finish(run_id)
    log.info("stats: %d clips, %d bad, %.0f s -> %s", len(video_ids), len(bad), marker["seconds"], folder)
    return marker
