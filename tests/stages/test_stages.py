"""The Ray stages on the tiny built-in dataset: exactness against the in-process core, resume,
clear errors, and the whole pipeline with MLflow (Ray Train teacher and students)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from support.stage_helpers import imported_config, teacher_file

from tsgd_ray import artifacts, layout, methods, storage
from tsgd_ray.artifacts import load_teacher, read_init, read_statistics, read_synthetic
from tsgd_ray.config import ConfigError, load_config
from tsgd_ray.core import augment, packing, selection, training
from tsgd_ray.core.bn_stats import accumulate_statistics
from tsgd_ray.core.clips import to_model_input
from tsgd_ray.core.models import ModelError
from tsgd_ray.core.selection import seeded_priority
from tsgd_ray.core.tsgf import motion_energy
from tsgd_ray.data.catalogs import build_catalog
from tsgd_ray.data.in_memory import load_split
from tsgd_ray.data.video import decode_view, probe
from tsgd_ray.methods import method_config, run_order
from tsgd_ray.settings import crop_settings, input_settings, saliency_settings
from tsgd_ray.stages.distill import run_distill
from tsgd_ray.stages.init import run_init
from tsgd_ray.stages.merge import MergeError, run_merge
from tsgd_ray.stages.pipeline import results_table
from tsgd_ray.stages.stats import run_stats
from tsgd_ray.stages.teacher import run_teacher
from tsgd_ray.tracking import compare_runs

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def load_split_ids(cfg) -> list[str]:
    """The video ids of the train split, in the order `load_split` decodes them."""
    return [r.video_id for r in build_catalog(cfg).records if r.split == "train"]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return teacher_file(tmp_path_factory.mktemp("teacher"))


def test_stats_and_distill_match_the_in_process_core(prepared, tmp_path, teacher_path):
    cfg = imported_config(
        tmp_path / "out",
        teacher_path,
        "distill.actors=2",
        "distill.ipc=2",
        "stats.actors=2",
        "stats.cpus_per_actor=0.5",
        "stats.batch_size=3",
    )
    prepared(cfg)
    assert run_teacher(cfg)["source"] == "imported"
    marker = run_stats(cfg)
    run_init(cfg)
    clips, labels, classes = load_split(cfg, "train")
    teacher = load_teacher(cfg, classes)
    x = to_model_input(clips, cfg.data.mean, cfg.data.std)
    expected = accumulate_statistics(
        teacher, [(x[i : i + 5], labels[i : i + 5]) for i in range(0, len(x), 5)], len(classes)
    )
    assert read_statistics(cfg) == expected  # integer sums: bit-identical whatever the shard order or actor count
    assert marker["clips"] == len(labels) and marker["bad_videos"] == []
    assert marker["source"] == "clip_cache" and marker["decodes"] == 0  # read what prepare decoded

    init = read_init(cfg, range(len(classes)))
    assert init["labels"].tolist() == sorted([c for c in range(len(classes))] * 2)
    assert init["indices"].tolist() == [0, 1] * len(classes)
    # the chosen clips are the seeded-priority picks, read back by (cache file, row): the same
    # pixels as decoding those videos in-process
    ids = load_split_ids(cfg)
    for clip, label, vid in zip(init["clips"], init["labels"], init["video_ids"]):
        row = ids.index(vid)
        assert int(labels[row]) == int(label) and torch.equal(clip, clips[row])
    priorities = {
        c: sorted((seeded_priority(cfg.seed, v), v) for v, l in zip(ids, labels.tolist()) if l == c)
        for c in range(len(classes))
    }
    assert [v for c in range(len(classes)) for _, v in priorities[c][:2]] == init["video_ids"]
    one = read_init(cfg, [3])  # an actor of one class reads that class only
    assert one["labels"].tolist() == [3, 3] and torch.equal(one["clips"], init["clips"][init["labels"] == 3])

    summary = run_distill(cfg)
    assert summary["recovered"] == 4 and summary["actor_failures"] == 0
    manifest = run_merge(cfg)
    synthetic, merged_classes = read_synthetic(cfg)
    assert merged_classes == classes and synthetic["labels"].tolist() == init["labels"].tolist()
    assert synthetic["clips"].dtype == torch.uint8 and synthetic["clips"].shape[1:] == init["clips"].shape[1:]
    # each synthetic video carries TSGFA's map of the clip it started from, not of itself
    init_heat = (
        (255 * training.clip_heat(init["clips"], saliency_settings(cfg.tsgf), input_settings(cfg)))
        .round()
        .to(torch.uint8)
    )
    assert torch.equal(synthetic["heat"], init_heat) and init["heat"] is None
    folder = layout.of(cfg).synthetic
    for f in manifest["files"]:  # the manifest's hash is the hash of the file the actor wrote
        assert hashlib.sha256(storage.read_bytes(storage.join(folder, f["path"]))).hexdigest() == f["sha256"]
    halves = [read_synthetic(cfg, rank=r, world=2)[0] for r in (0, 1)]  # an evaluate worker reads its rows only
    assert sorted(halves[0]["video_ids"] + halves[1]["video_ids"]) == sorted(synthetic["video_ids"])
    assert len(halves[0]["labels"]) == len(halves[1]["labels"]) == len(synthetic["labels"]) // 2


def test_statistics_are_shared_by_an_ipc_sweep(prepared, tmp_path, teacher_path):
    one = imported_config(tmp_path / "out", teacher_path, "distill.ipc=1")
    three = imported_config(tmp_path / "out", teacher_path, "distill.ipc=3", "distill.init=lowest_loss")
    prepared(one)
    run_teacher(one)
    assert layout.of(one).stats == layout.of(three).stats and layout.of(one).init != layout.of(three).init
    first = run_stats(one)
    run_init(one)
    second = run_stats(three)
    assert second["skipped"] and not first.get("skipped")  # the pass ran once; only the init set was added
    assert not run_init(three).get("skipped")
    candidates = artifacts.read_candidates(three)["lowest_loss"]
    init = read_init(three, range(8))
    for c in range(8):
        assert [e["video_id"] for e in candidates[c][:3]] == [
            v for v, l in zip(init["video_ids"], init["labels"]) if l == c
        ]
        assert [e["loss"] for e in candidates[c]] == sorted(e["loss"] for e in candidates[c])
    with pytest.raises(ConfigError, match="distill.ipc=5: these classes have fewer"):
        run_init(imported_config(tmp_path / "out", teacher_path, "distill.ipc=5"))

    # stats.augment: a pass of its own, on one fixed recovery view per clip, whatever the batching
    viewed = imported_config(tmp_path / "out", teacher_path, "stats.augment=true", "stats.batch_size=5")
    assert layout.of(viewed).stats != layout.of(one).stats
    assert not run_stats(viewed).get("skipped")
    clips, labels, classes = load_split(viewed, "train")
    teacher = load_teacher(viewed, classes)
    x = augment.keyed_views(
        to_model_input(clips, viewed.data.mean, viewed.data.std),
        load_split_ids(viewed),
        viewed.seed,
        crop_settings(viewed.augment),
    )
    assert read_statistics(viewed) == accumulate_statistics(teacher, [(x, labels)], len(classes))
    assert read_statistics(viewed) != read_statistics(one)


def test_a_packed_set_tiles_four_init_clips_where_the_teacher_is_sure(prepared, tmp_path, teacher_path):
    """distill.pack: init takes 4 x ipc clips per class (the folder an unpacked run at 4 x ipc
    uses), and each synthetic video starts as the 2 x 2 tile of four of them where the teacher's
    probability of the class on the tile reaches distill.pack_confidence, else as the first."""
    base = ["distill.ipc=1", "distill.iterations=0", "distill.pack=true"]
    probe_cfg = imported_config(tmp_path / "out", teacher_path, *base)
    assert layout.of(probe_cfg).init == layout.of(imported_config(tmp_path / "out", teacher_path, "distill.ipc=4")).init
    prepared(probe_cfg)
    run_teacher(probe_cfg)
    run_stats(probe_cfg)
    assert run_init(probe_cfg)["per_class"] == 4
    init = read_init(probe_cfg, range(8))
    assert init["indices"].tolist() == [0, 1, 2, 3] * 8
    _, _, classes = load_split(probe_cfg, "train")
    inputs = input_settings(probe_cfg)
    heat = training.clip_heat(init["clips"], saliency_settings(probe_cfg.tsgf), inputs)
    tiles = packing.pack(init["clips"], heat)
    teacher = load_teacher(probe_cfg, classes)
    labels = torch.arange(8)
    confidence = training.predict(teacher, tiles, inputs).softmax(1)[labels, labels].sort().values
    threshold = float(confidence[3:5].mean())  # half the classes above it, half below
    cfg = imported_config(tmp_path / "out", teacher_path, *base, f"distill.pack_confidence={threshold}")
    run_distill(cfg)
    run_merge(cfg)
    synthetic, _ = read_synthetic(cfg)
    assert synthetic["labels"].tolist() == list(range(8)) and synthetic["indices"].tolist() == [0] * 8
    sure = training.predict(teacher, tiles, inputs).softmax(1)[labels, labels] >= threshold
    assert sure.sum() == 4
    for c in range(8):
        ids = init["video_ids"][4 * c : 4 * c + 4]
        expected, video_id = (tiles[c], "+".join(ids)) if sure[c] else (init["clips"][4 * c], ids[0])
        assert synthetic["video_ids"][c] == video_id
        assert (synthetic["clips"][c].int() - expected.int()).abs().max() <= 1  # a float round trip, no steps


def test_multi_view_init_starts_from_the_chosen_view_of_each_clip(prepared, tmp_path, teacher_path):
    """stats.init_views: lowest_loss (RDED-style) ranks clips by their best view's loss, and
    motion_window keeps real's videos, each from its view of the largest window score; the init
    clip is that view decoded again."""
    import torch.nn.functional as F

    cfg = imported_config(
        tmp_path / "out", teacher_path, "distill.ipc=2", "distill.init=lowest_loss", "stats.init_views=4"
    )
    prepared(cfg)
    run_teacher(cfg)
    stats = run_stats(cfg)
    init_marker = run_init(cfg)
    clips, labels, classes = load_split(cfg, "train")
    # the extra views need the videos: the pass decodes every view of every clip, init its choice again
    assert stats["source"] == "shards" and stats["decodes"] == 4 * len(labels)
    assert init_marker["decodes"] == 2 * len(classes)
    teacher = load_teacher(cfg, classes)
    records = [r for r in build_catalog(cfg).records if r.split == "train"]
    d = cfg.data
    views = torch.stack(
        [clips]
        + [
            torch.from_numpy(
                np.stack(
                    [
                        decode_view(
                            storage.read_bytes(r.uri),
                            d.num_frames,
                            d.height,
                            d.width,
                            d.frame_interval,
                            cfg.seed,
                            r.video_id,
                            v,
                        )
                        for r in records
                    ]
                )
            )
            for v in range(1, 4)
        ]
    )  # (4, N, F, H, W, 3)
    with torch.no_grad():
        losses = torch.stack(
            [F.cross_entropy(teacher(to_model_input(v, d.mean, d.std)), labels, reduction="none") for v in views]
        )
    best, best_view = losses.min(0)
    assert (best_view > 0).float().mean() > 0.5  # with four views, the sampled clip is rarely the easiest
    candidates = artifacts.read_candidates(cfg)["lowest_loss"]
    init = read_init(cfg, range(len(classes)))
    for c in range(len(classes)):
        rows = sorted(
            (l for l in range(len(records)) if labels[l] == c), key=lambda l: (float(best[l]), records[l].video_id)
        )[:2]
        assert [e["video_id"] for e in candidates[c][:2]] == [records[l].video_id for l in rows]
        assert [e["view"] for e in candidates[c][:2]] == [int(best_view[l]) for l in rows]
        assert [e["loss"] for e in candidates[c][:2]] == pytest.approx(
            [float(best[l]) for l in rows], rel=1e-4, abs=1e-5
        )
        chosen = init["clips"][init["labels"] == c]
        assert all(torch.equal(chosen[i], views[best_view[l], l]) for i, l in enumerate(rows))

    # motion_window (the same pass): real's seeded videos, each from its view of the largest
    # motion energy x teacher margin, decoded again by init
    with torch.no_grad():
        scores = torch.stack(
            [
                selection.window_score(teacher(x), labels, motion_energy(x, cfg.tsgf.compensate))
                for x in (to_model_input(v, d.mean, d.std) for v in views)
            ]
        )
    window = scores.argmax(0)
    assert (window > 0).any() and (window != best_view).any()  # a choice of its own
    kept = artifacts.read_candidates(cfg)
    assert [[e["video_id"] for e in c] for c in kept["motion_window"]] == [
        [e["video_id"] for e in c] for c in kept["real"]
    ]
    windowed = imported_config(
        tmp_path / "out", teacher_path, "distill.ipc=2", "distill.init=motion_window", "stats.init_views=4"
    )
    assert run_init(windowed)["init"] == "motion_window"
    init = read_init(windowed, range(len(classes)))
    position = {r.video_id: l for l, r in enumerate(records)}
    for c in range(len(classes)):
        rows = [position[e["video_id"]] for e in kept["real"][c][:2]]
        assert [e["view"] for e in kept["motion_window"][c][:2]] == [int(window[l]) for l in rows]
        chosen = init["clips"][init["labels"] == c]
        assert all(torch.equal(chosen[i], views[window[l], l]) for i, l in enumerate(rows))


def test_reruns_skip_finished_work_and_merge_names_missing_classes(prepared, tmp_path, teacher_path):
    cfg = imported_config(tmp_path / "out", teacher_path)
    prepared(cfg)
    run_teacher(cfg)
    run_stats(cfg)
    run_init(cfg)
    assert run_stats(cfg)["skipped"] and run_init(cfg)["skipped"] and run_teacher(cfg)["skipped"]
    run_distill(cfg)
    # lose one partition (as if its actor died before writing): merge names its classes
    os.unlink(layout.of(cfg).partition_marker(2))
    os.unlink(storage.join(layout.of(cfg).synthetic, layout.partition_file(2)))
    classes = load_split(cfg, "test")[2]
    with pytest.raises(MergeError, match=rf"{classes[4]} \(0\), {classes[5]} \(0\)"):
        run_merge(cfg)
    before = {p: os.stat(layout.of(cfg).partition_marker(p)).st_mtime_ns for p in (0, 1, 3)}
    summary = run_distill(cfg)
    assert (summary["skipped"], summary["recovered"]) == (3, 1)
    assert {p: os.stat(layout.of(cfg).partition_marker(p)).st_mtime_ns for p in (0, 1, 3)} == before
    manifest = run_merge(cfg)
    assert manifest["num_videos"] == 8 and run_merge(cfg)["skipped"]
    frames = probe(storage.read_bytes(storage.join(layout.of(cfg).synthetic, manifest["preview"])))
    assert frames.num_frames == cfg.data.num_frames and frames.width >= 2 * 64


def test_imported_teacher_with_another_class_map_is_refused(prepared, tmp_path, teacher_path):
    from tsgd_ray.core.models import checkpoint_bytes, load_checkpoint
    from tsgd_ray.stages.teacher import new_teacher

    cfg = imported_config(tmp_path / "out", teacher_path)
    prepared(cfg)
    names = load_split(cfg, "test")[2]
    model = load_checkpoint(new_teacher(cfg, len(names)), teacher_path.read_bytes(), names)
    swapped = tmp_path / "swapped.pt"
    swapped.write_bytes(checkpoint_bytes(model, [names[1], names[0], *names[2:]]))
    with pytest.raises(ModelError, match="same names in another order"):
        run_teacher(imported_config(tmp_path / "out", swapped))
    # nothing half-written (the stage's released lease is bookkeeping, not an output)
    assert [f for f in storage.list_files(str(tmp_path / "out" / "teacher")) if "/_lease/" not in f] == []


def test_a_whole_run_then_one_key_changed_reuses_what_it_can_and_compares(finished_run, tmp_path):
    """The session's finished run (the whole pipeline: a Ray Train teacher and students, `full`
    streamed, MLflow) and its second invocation differing only in tsgf.enabled: it reused the
    teacher and statistics, and the two parent runs are found by search_runs, carry the same
    metric names and compare side by side."""
    from conftest import SMALL_RUN
    from mlflow.tracking import MlflowClient

    root, _ = finished_run
    cfg = load_config("default", [f"storage.output_root={root}", *SMALL_RUN])
    off = load_config("default", [f"storage.output_root={root}", *SMALL_RUN, "tsgf.enabled=false"])
    assert layout.of(off).teacher == layout.of(cfg).teacher and layout.of(off).stats == layout.of(cfg).stats
    results = [storage.read_json(layout.of(method_config(cfg, m), m).results) for m in run_order(cfg)]
    assert [r["method"] for r in results] == [m.value for m in run_order(cfg)]
    for r in results:
        assert len(r["top1"]) == 2 and all(0 <= a <= b <= 1 for a, b in zip(r["top1"], r["top5"]))
        assert r["test_clips"] == 16
    table = results_table(results)
    assert "| tsgd | 2 |" in table and "| full | all |" in table

    client = MlflowClient(cfg.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.command = 'run' and attributes.status = 'FINISHED'")
    by_flag = {r.data.params["tsgf.enabled"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(by_flag) == {"True", "False"}
    parent = by_flag["True"]
    assert parent.data.tags["git_commit"] and parent.data.tags["dataset_manifest_sha256"]
    assert parent.data.tags["teacher_sha256"]
    plan = client.download_artifacts(parent.info.run_id, "plan.txt", str(tmp_path))  # with the manifest's counts
    assert open(plan).read().startswith("plan: 64 train / 16 eval videos, 8 classes (from the shard manifest)")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = sorted(r.data.tags["stage"] for r in children)
    distilled = [m for m in run_order(cfg) if methods.get(m).distils]
    inits = {layout.of(method_config(cfg, m)).init for m in distilled}  # packed_real draws 4 x IPC
    expected = ["teacher", "stats", *["init"] * len(inits), *["distill", "merge"] * len(distilled)]
    assert stages == sorted([*expected, *(f"evaluate/{m.value}" for m in run_order(cfg))])
    distill_run = next(r for r in children if r.data.tags["stage"] == "distill" and r.data.tags["method"] == "tsgd")
    assert len(client.get_metric_history(distill_run.info.run_id, "loss")) >= 2  # the partitions' mean curve
    merge_run = next(r for r in children if r.data.tags["stage"] == "merge")
    logged = {a.path for a in client.list_artifacts(merge_run.info.run_id, "synthetic")}
    assert {"synthetic/manifest.json", "synthetic/previews"} <= logged

    assert {"tsgd/top1_mean", "tsgd/top5_mean"} <= set(by_flag["True"].data.metrics) & set(
        by_flag["False"].data.metrics
    )
    off_children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{by_flag['False'].info.run_id}'"
    )
    assert "teacher" not in {r.data.tags["stage"] for r in off_children}  # reused, not retrained
    assert {"distill", "evaluate/tsgd"} <= {r.data.tags["stage"] for r in off_children}

    table = compare_runs(off).splitlines()  # `tsgd-ray compare`: newest first, only what differs
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:2] == ["run", "tsgf.enabled"] and "tsgd top-1 %" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[0][-9:-1], row[1]) for row in rows] == [
        (by_flag["False"].info.run_id[:8], "False"),
        (by_flag["True"].info.run_id[:8], "True"),
    ]
    top1 = header.index("tsgd top-1 %")
    for row, run in zip(rows, (by_flag["False"], by_flag["True"])):
        assert (
            row[top1]
            == f"{100 * run.data.metrics['tsgd/top1_mean']:.1f} +- {100 * run.data.metrics['tsgd/top1_std']:.1f}"
        )
