"""The calibration table: lookups, merging, and a row for every shipped config's models."""

from __future__ import annotations

import pytest

from tsgd_ray import calibration, layout
from tsgd_ray.config import config_names, load_config


def test_feed_rates_scale_with_clip_bytes_and_rows_merge_by_key(tmp_path):
    rows = [{"kind": "feed", "work": "read", "clip": [8, 32, 32], "rate": 800.0, "source": "a"}]
    assert calibration.feed(rows, "read", [8, 32, 32]) == (800.0, "measured")
    assert calibration.feed(rows, "read", [16, 64, 64]) == (100.0, "scaled from 8x32x32")  # 8x the bytes
    assert calibration.feed(rows, "decode", [8, 32, 32]) is None

    path = tmp_path / "table.json"
    calibration.save(rows, path)
    calibration.save(
        [{**rows[0], "rate": 900.0, "source": "b"}, {"kind": "start", "work": "stats", "seconds": 5.0}], path
    )
    merged = calibration.load(path)
    assert len(merged) == 2 and calibration.feed(merged, "read", [8, 32, 32])[0] == 900.0
    assert calibration.start(merged, "stats") == 5.0 and calibration.start(merged, "teacher") == 0.0
    assert calibration.load(tmp_path / "none.json") == []


@pytest.mark.parametrize("name", config_names())
def test_every_shipped_config_has_measured_cpu_rows(name):
    """benchmarks/calibrate.py was run for each shipped config: its plan's CPU side is measured."""
    cfg = load_config(name, ["storage.output_root=/nonexistent/plan"])
    rows, clip = calibration.load(), layout.clip_size(cfg)
    t, e = cfg.teacher, cfg.evaluate
    for section, works in ((t, ("train", "forward", "recovery")), (e, ("train", "forward"))):
        for work in works:
            found = calibration.compute(rows, "cpu", work, section.model, section.width, section.depth, clip)
            assert found and found["rate"] > 0 and found["source"], (name, section.model, work)
    assert calibration.feed(rows, "decode", clip)[1] == "measured"
    assert calibration.feed(rows, "read", clip)[1] == "measured"
    assert all(calibration.start(rows, stage) > 0 for stage in ("teacher", "stats", "distill", "evaluate"))


def test_a_gpu_run_becomes_rows_the_plan_reads(tmp_path, monkeypatch):
    """benchmarks/gpu.py's measurements on an H100 turn into h100 rows; with them merged, the
    kinetics400 plan's teacher and distill compute rates on an h100 are measured, not assumed."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu import calibration_rows

    from tsgd_ray.plan import make_plan

    report = {
        "recovery": [
            {"model": "mini_c3d", "width": 64, "size": [8, 64, 64], "chunk": c, "video_iterations_per_s": 100.0 * c}
            for c in (10, 50)
        ],
        "training": [
            {"role": r, "model": "mini_c3d", "size": [8, 64, 64], "clips_per_s": 1200.0} for r in ("student", "teacher")
        ],
    }
    rows = calibration_rows("NVIDIA H100 80GB HBM3", report)
    assert {(r["work"], r["rate"]) for r in rows} == {("recovery", 5000.0), ("train", 1200.0)}
    assert calibration_rows("cpu", report) == []
    path = tmp_path / "table.json"
    calibration.save(calibration.load() + rows, path)
    monkeypatch.setattr(calibration, "TABLE", path)
    cfg = load_config("kinetics400", ["storage.output_root=/nonexistent/plan"])
    stages = {s.name: s for s in make_plan(cfg, "h100")["stages"]}
    assert "compute 1,200/s measured" in stages["teacher"].timing
    assert "compute 5,000/s measured" in stages["distill/tsgd"].timing
