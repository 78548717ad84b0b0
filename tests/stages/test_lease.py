"""Stage leases: two runs of one stage never work at once; a dead run's lease expires."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import tiny_config

from tsgd_ray import lease, storage
from tsgd_ray.cli import run_command
from tsgd_ray.config import to_yaml
from tsgd_ray.data.shards import shards_root
from tsgd_ray.stages.skeleton import run_stage

pytestmark = pytest.mark.timeout(120)


def test_a_held_stage_is_refused_then_free_after_release(store_root):
    with lease.hold(store_root, 60, wait=False, what="teacher"):
        with pytest.raises(lease.LeaseHeld, match=r"teacher: another run works on .* pid \d+"):
            with lease.hold(store_root, 60, wait=False, what="teacher"):
                pass
    with lease.hold(store_root, 60, wait=False, what="teacher"):  # released: free at once
        generation, content = lease.newest(store_root)
        assert not content["released"]
    assert lease.newest(store_root)[1]["released"]
    assert len(storage.list_files(storage.join(store_root, lease.FOLDER))) == 1  # older generations removed


def test_the_holder_renews_and_a_dead_holders_lease_expires(store_root):
    holder = lease._Holder(store_root, seconds=2.0)
    assert holder.try_take() is None
    time.sleep(3.0)  # longer than the lease: only renewal keeps it
    with pytest.raises(lease.LeaseHeld):
        with lease.hold(store_root, 2.0, wait=False, what="stats"):
            pass
    holder._stop.set()  # the holder dies: no more renewals, no release
    holder._thread.join()
    died = time.time()
    with lease.hold(store_root, 2.0, wait=True, what="stats"):  # waits for the expiry, then takes over
        waited = time.time() - died
        assert lease.newest(store_root)[1]["holder"] != holder.identity["holder"]
    assert 0.5 < waited < 10.0


def test_of_runs_racing_for_a_free_lease_exactly_one_wins(store_root):
    holders = [lease._Holder(store_root, 60) for _ in range(6)]
    results = {}
    barrier = threading.Barrier(len(holders))

    def take(i: int) -> None:
        barrier.wait()
        results[i] = holders[i].try_take() is None

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(holders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert lease.newest(store_root)[1]["holder"] == holders[winners[0]].identity["holder"]
    holders[winners[0]].release()


def test_a_second_run_of_a_stage_waits_and_then_skips_it(tmp_path):
    cfg = tiny_config(tmp_path / "out", "storage.lease_seconds=4")
    marker = storage.join(str(tmp_path / "out"), "stage", "done.json")
    calls, results = [], {}

    def work(run_id):
        calls.append(time.time())
        time.sleep(3.0)
        return {"value": 1}

    def run(i: int) -> None:
        results[i] = run_stage(cfg, "stage", marker, work)

    first = threading.Thread(target=run, args=(0,))
    first.start()
    while not calls:
        time.sleep(0.05)
    second = threading.Thread(target=run, args=(1,))
    second.start()
    first.join()
    second.join()
    assert len(calls) == 1
    assert results[0]["value"] == results[1]["value"] == 1
    assert not results[0].get("skipped") and results[1]["skipped"]


@pytest.mark.ray
def test_the_command_line_refuses_a_held_stage_in_one_line(ray_session, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    with lease.hold(shards_root(cfg), 60, wait=False, what="prepare"):
        capsys.readouterr()
        assert run_command("prepare", str(path), ["storage.wait_for_lease=false"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("tsgd-ray prepare: error: prepare: another run works on")
    assert "Traceback" not in err and not storage.exists(storage.join(shards_root(cfg), "manifest.json"))
