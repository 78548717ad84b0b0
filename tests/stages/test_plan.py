"""`tsgd-ray plan`: what a run will do and cost, before any spend, on every shipped config."""

from __future__ import annotations

import re

import pytest
from support.stage_helpers import imported_config, teacher_file

from tsgd_ray.cli import main
from tsgd_ray.config import config_names, load_config
from tsgd_ray.plan import GPUS, make_plan, model_cost, render
from tsgd_ray.stages.prepare import decode_once, run_prepare
from tsgd_ray.stages.teacher import run_teacher


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_has_a_plan(name, monkeypatch, s3_server, tmp_path):
    """On the loopback S3 server (an empty bucket): nothing is finished, every stage has its
    resources, reads, writes and GPU time, and a cluster config asks for GPUs on every model stage."""
    monkeypatch.chdir(tmp_path)  # never the checkout: its outputs/ are the user's
    cfg = load_config(name)
    plan = make_plan(cfg)
    stages = {s.name: s for s in plan["stages"]}
    assert list(stages)[:5] == ["prepare", "teacher", "stats", "distill/tsgd", "evaluate/tsgd"]
    assert all(s.finished is False and s.folder and s.resources and s.reads and s.writes for s in stages.values())
    assert plan["counts"]["train"] > 0 and plan["counts"]["classes"] > 0 and not plan["storage_error"]
    assert plan["gpu_hours"] == pytest.approx(sum(s.gpu_hours for s in stages.values()))
    fleet = [s for s in stages.values() if s.name.startswith("evaluate/")]
    others = sum(s.wall_s for s in stages.values() if s not in fleet)
    assert plan["wall_s"] == pytest.approx(others + plan["fleet_wall_s"]) and plan["wall_s"] > 0
    assert max(s.wall_s / s.units for s in fleet) <= plan["fleet_wall_s"] <= sum(s.wall_s for s in fleet) * 1.000001
    assert plan["dollars"] == pytest.approx(plan["gpu_hours"] * GPUS["a10g"].dollars_per_hour)
    if name != "default":
        for stage in ("teacher", "stats", "distill/tsgd", "evaluate/tsgd"):
            assert "GPU: 1}" in stages[stage].resources, (stage, stages[stage].resources)
        assert all(stages[s].gpu_hours > 0 for s in ("teacher", "distill/tsgd", "evaluate/tsgd"))
    assert all(s.name in render(plan) for s in stages.values())
    for baseline in cfg.evaluate.baselines:  # each baseline distils (the *_real ones without recovery) and evaluates
        assert f"evaluate/{baseline.value}" in stages
        if baseline.value != "full":
            recovers = not stages[f"distill/{baseline.value}"].timing.split("; ")[1].startswith("0 iterations")
            assert recovers == (baseline.value not in ("random_real", "packed_real"))


def test_the_evaluation_fleet_runs_its_students_at_once():
    """Three seeds of four methods on 64-worker stages: the students (one worker each) run at once,
    so the fleet takes one Ray Train start and its longest student; one slot takes one start and
    them all in turn; the booked GPU-hours do not change."""
    from tsgd_ray import calibration

    base = ["storage.output_root=/nonexistent/plan", "evaluate.seeds=[0,1,2]", "teacher.num_workers=64"]
    base.append("evaluate.baselines=[random_real,sre2l_video,full]")
    at_once = make_plan(load_config("kinetics400", base), "h100")
    in_turn = make_plan(load_config("kinetics400", [*base, "evaluate.students_at_once=1"]), "h100")
    students = [s for s in at_once["stages"] if s.name.startswith("evaluate/")]
    assert len(students) == 4 and all(s.units == 3 and s.unit_workers == 1 for s in students)
    start = calibration.start(calibration.load(), "evaluate")
    assert start > 0
    assert at_once["fleet_wall_s"] == pytest.approx(start + max((s.wall_s - start) / 3 for s in students))
    assert in_turn["fleet_wall_s"] == pytest.approx(start + sum(s.wall_s - start for s in students))
    assert in_turn["gpu_hours"] == pytest.approx(at_once["gpu_hours"])
    assert "evaluation fleet: its students at once" in render(at_once)


def test_the_full_baseline_has_its_own_batch_workers_and_scaled_learning_rate():
    from tsgd_ray import layout
    from tsgd_ray.config import Method
    from tsgd_ray.methods import method_config

    base = ["storage.output_root=/nonexistent/plan", "evaluate.batch_size=32", "evaluate.lr=0.001"]
    base.append("evaluate.baselines=[full]")
    cfg = load_config("kinetics400", [*base, "evaluate.full.batch_size=256", "evaluate.full.num_workers=8"])
    full = method_config(cfg, Method.full).evaluate
    assert (full.batch_size, full.num_workers, full.lr) == (256, 8, pytest.approx(0.008))  # linear scaling
    assert method_config(cfg, Method.tsgd).evaluate.batch_size == 32
    plain = load_config("kinetics400", base)
    # the full section re-keys the full student only
    assert (
        layout.of(method_config(cfg, Method.tsgd), Method.tsgd).evaluate
        == layout.of(method_config(plain, Method.tsgd), Method.tsgd).evaluate
    )
    assert (
        layout.of(method_config(cfg, Method.full), Method.full).evaluate
        != layout.of(method_config(plain, Method.full), Method.full).evaluate
    )
    stage = next(s for s in make_plan(cfg, "h100")["stages"] if s.name == "evaluate/full")
    assert stage.unit_workers == 8 and "8 x {CPU" in stage.resources


def test_gpu_time_and_memory_follow_the_work():
    """Twice the recovery iterations: twice distill's GPU time without stored labels; the stored
    labels' views add time in proportion; a partition too large for the GPU is a warning that
    names the keys to change."""

    def distill_hours(*overrides):
        cfg = load_config("kinetics400", ["storage.output_root=/nonexistent/plan", *overrides])
        return next(s.gpu_hours for s in make_plan(cfg, table=[])["stages"] if s.name == "distill/tsgd")

    hard = ("distill.labels.views=0", "evaluate.labels=hard")
    assert distill_hours(*hard, "distill.iterations=2000") == pytest.approx(2 * distill_hours(*hard))
    eight = distill_hours("distill.labels.views=8", "evaluate.views=8") - distill_hours(*hard)
    assert eight > 0 and distill_hours("distill.labels.views=16") - distill_hours(*hard) == pytest.approx(2 * eight)
    base = load_config("kinetics400", ["storage.output_root=/nonexistent/plan"])
    big = load_config(
        "kinetics400",
        [
            "storage.output_root=/nonexistent/plan",
            "distill.ipc=50",
            "distill.pack=false",
            "evaluate.baselines=[]",  # packed_real packs: 4 x 50 init clips per class is more than there are
            "distill.partitions=1",
            "data.num_frames=16",
            "data.height=112",
            "data.width=112",
        ],
    )
    distill = next(s for s in make_plan(big)["stages"] if s.name == "distill/tsgd")
    cost = model_cost("mini_c3d", 64, 4, (16, 112, 112), 400)
    assert distill.warnings and "distill.max_videos_per_partition" in distill.warnings[0]
    assert "20000 videos" in distill.memory and cost.activation_bytes > 300 * 2**20  # as docs/sizing.md measures
    assert not next(s for s in make_plan(base)["stages"] if s.name == "distill/tsgd").warnings


@pytest.mark.parametrize("release, train, classes", [(400, 240_000, 400), (600, 392_000, 600), (700, 545_000, 700)])
def test_before_prepare_a_kinetics_plan_counts_its_release(release, train, classes):
    """Kinetics-700 is not planned with Kinetics-400's counts: more videos, more classes, more GPU time."""
    cfg = load_config("kinetics400", ["storage.output_root=/nonexistent/plan", f"data.release={release}"])
    plan = make_plan(cfg)
    assert (plan["counts"]["train"], plan["counts"]["classes"]) == (train, classes)
    assert plan["counts"]["source"] == f"kinetics{release}'s nominal size (not prepared yet)"
    k400 = make_plan(load_config("kinetics400", ["storage.output_root=/nonexistent/plan"]))
    assert (plan["gpu_hours"] > k400["gpu_hours"]) == (release > 400)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_plan_reads_the_manifest_and_skips_finished_stages(ray_session, tmp_path):
    teacher = teacher_file(tmp_path / "teacher")
    cfg = imported_config(tmp_path / "out", teacher)
    run_prepare(cfg)
    run_teacher(cfg)
    assert not next(s for s in make_plan(cfg)["stages"] if s.name == "prepare").finished  # clips not decoded
    decode_once(cfg)
    plan = make_plan(cfg)
    stages = {s.name: s for s in plan["stages"]}
    assert plan["counts"]["source"] == "the shard manifest" and plan["counts"]["classes"] == 8
    assert plan["counts"]["train"] == 8 * cfg.data.builtin.train_per_class
    assert stages["prepare"].finished and stages["teacher"].finished and not stages["stats"].finished
    assert "imported" in stages["teacher"].resources and "MiB of shards, a clip cache of" in stages["prepare"].writes
    assert plan["gpu_hours"] == pytest.approx(sum(s.gpu_hours for s in stages.values() if not s.finished))


SIZE = [8, 64, 64]  # the kinetics400 config's clips
TABLE = [
    {"kind": "compute", "device": "h100", "work": "train", "model": "mini_c3d", "width": 64, "depth": 4, "clip": SIZE}
    | {"rate": 1000.0, "source": "test"},
    {"kind": "feed", "work": "read", "clip": SIZE, "rate": 100.0, "source": "test"},
    {"kind": "feed", "work": "decode", "clip": SIZE, "rate": 50.0, "source": "test"},
    {"kind": "start", "work": "teacher", "seconds": 30.0, "source": "test"},
]


def teacher_stage(table, *overrides, name="teacher"):
    cfg = load_config("kinetics400", ["storage.output_root=/nonexistent/plan", *overrides])
    return next(s for s in make_plan(cfg, "h100", table)["stages"] if s.name == name)


def test_a_stage_takes_the_slower_of_its_measured_compute_and_feed():
    """The teacher (8 workers x 4 CPUs, 20 epochs x 240k clips) booked for start-up and epochs at
    min(GPU, 4 CPUs reading); the clip cache (32 one-CPU decoders) is built in prepare, on CPUs only;
    more CPUs per worker raise its busy fraction; without rows, FLOPs at the assumed throughput."""
    starved = teacher_stage(TABLE)
    start, epochs = 30.0, 20 * 240_000 / (8 * min(1000.0, 4 * 100.0))
    assert starved.wall_s == pytest.approx(start + epochs)
    prepare = teacher_stage(TABLE, name="prepare")
    assert prepare.wall_s == pytest.approx(260_000 / (32 * 50.0)) and prepare.gpu_hours == 0
    assert "clip cache: " in prepare.timing and "260,000 clips decoded once" in prepare.reads
    assert starved.busy == pytest.approx(20 * 240_000 / (8 * 1000.0) / starved.wall_s)
    assert starved.gpu_hours == pytest.approx(starved.wall_s * 8 / 3600)  # booked, not computing
    assert "compute 1,000/s measured" in starved.timing and "feed 400/s measured" in starved.timing
    assert any("starves its GPUs" in w for w in starved.warnings) and starved.busy < 0.5

    # stats reads the cache; candidate views beyond the first need the videos, decoded
    assert "read and probe 240,000 clips" in teacher_stage(TABLE, name="stats").timing
    assert "decode and probe 480,000 clips" in teacher_stage(TABLE, "stats.init_views=2", name="stats").timing

    fed = teacher_stage(TABLE, "teacher.cpus_per_worker=10")
    assert fed.busy > 0.5 and fed.wall_s < starved.wall_s and not fed.warnings

    assumed = teacher_stage([])
    assert "assumed" in assumed.timing and "start not measured" in assumed.timing
    assert assumed.busy == pytest.approx(1.0)  # nothing measured to wait for
    on_cpus = make_plan(load_config("kinetics400", ["storage.output_root=/nonexistent/plan"]), "cpu")
    assert on_cpus["gpu_hours"] == 0 and on_cpus["wall_s"] > 0  # planning a run on CPUs: time, no GPU


def test_the_command_prints_the_plan(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # never the checkout: its outputs/ are the user's
    assert main(["plan", "ucf101", "storage.output_root=/nonexistent/plan", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: 9,537 train / 3,783 eval videos, 101 classes") and "on a h100" in out
    assert "total to run:" in out.splitlines()[-1]

    assert main(["plan", "kinetics400", "storage.output_root=/nonexistent/plan", "--gpu", "h100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    teacher = next(line for line in lines if line.startswith("teacher "))
    assert re.search(r"~[\d.]+ (s|min|h) wall, ~[\d.]+ GPU-h booked, GPUs \d+% busy$", teacher), teacher
    assert re.match(r"total to run: ~[\d.]+ (s|min|h) wall, ~[\d.]+ GPU-hours booked", lines[-1])
