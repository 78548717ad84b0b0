"""Evaluation as a fleet: the (method, seed) students queued onto as many slots as the cluster
holds, each slot one Ray Train run training its students in turn; a student checkpoints every few
epochs and resumes after its worker dies, and ends where it would have ended uninterrupted,
whichever students trained beside it or before it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.clusters import run_script
from support.stage_helpers import imported_config, teacher_file

from tsgd_ray import layout, storage
from tsgd_ray.config import Method
from tsgd_ray.methods import method_config
from tsgd_ray.runtime.fleet import Fleet, Student, assign
from tsgd_ray.stages.evaluate import run_evaluate
from tsgd_ray.stages.pipeline import STAGES, run_method
from tsgd_ray.stages.teacher import run_teacher

pytestmark = pytest.mark.ray
THREE = "data.classes=[translate_right,translate_left,rotate_cw]"


def test_the_fleet_fits_as_many_student_workers_as_the_cluster_holds(ray_session, tmp_path):
    def room(*overrides):
        fleet = Fleet.for_config(imported_config(tmp_path, tmp_path / "t.pt", *overrides))
        return fleet.students, fleet.workers

    assert room("evaluate.cpus_per_worker=1") == (2, 2)  # the test session's Ray has 2 CPUs
    assert room("evaluate.cpus_per_worker=0.5") == (4, 4)
    assert room("evaluate.cpus_per_worker=4") == (1, 1)  # at least one student
    assert room("evaluate.cpus_per_worker=1", "data.clip_cache=false") == (1, 1)  # a CPU kept for Ray Data
    assert room("evaluate.cpus_per_worker=0.5", "evaluate.students_at_once=3")[0] == 3  # Ray places them


@pytest.mark.full
@pytest.mark.timeout(300)
def test_on_an_autoscaling_cluster_the_fleet_widens_as_nodes_arrive_and_idle_nodes_go(tmp_path):
    """From no worker nodes (infra/aws/cluster.yaml's types, one node each at most, its own process):
    the waiting students' GPU workers make the autoscaler add GPU nodes, never the CPU type; the
    fleet widens from the one worker it could place to one per GPU node, and once the students end,
    the idle nodes go. Then a stage asking for more GPUs a worker than any type has stops at once."""
    report = run_script("fleet_autoscaling.py", tmp_path / "out", timeout=280)
    gpu_types = {name for name, resources in report["types"].items() if resources.get("GPU")}
    assert len(gpu_types) == 3 and "cpu-decode" in report["types"]
    assert report["start"] == [1, 1] and report["slots"] == 4  # the head holds no student: at least one
    assert report["most_at_once"] == report["end"][0] == len(gpu_types)
    assert set(report["ran_on"]) == gpu_types and len(report["ran_on"]) == 4
    assert report["workers_left"] == 0 and report["idle_gone_s"] < 60
    # a request no node type can ever fit ends the wait with the key that asked for it
    assert report["infeasible"].startswith("evaluate.gpus_per_worker=2: no node type of this cluster has 2 GPU")
    assert report["infeasible_s"] < 60
    print(report)


def test_a_waiting_slots_demand_is_handed_back_once_placed(ray_session):
    """The placement group that shows the autoscaler a waiting slot's workers: placed (the room
    is there), it is removed at once, leaving the room to the slot's own run."""
    import ray
    from ray.util.placement_group import placement_group_table

    from tsgd_ray.runtime.fleet import _Demand

    demand = _Demand({"CPU": 0.5}, 1)
    demand.tick()
    group = demand.group
    ray.get(group.ready(), timeout=60)
    demand.tick()
    assert demand.group is None and placement_group_table(group)["state"] == "REMOVED"
    demand.tick()  # still waiting: asks again
    assert demand.group is not None
    demand.close()
    assert demand.group is None


def test_a_student_waits_for_room_for_all_its_workers():
    fleet, order = Fleet(students=3, workers=4), []

    def wide():
        with fleet.room(3):
            order.append("wide")

    late = threading.Thread(target=wide)
    with fleet.room(2):
        with fleet.room(1):
            late.start()
            time.sleep(0.2)
            order.append("narrow done")  # 2 + 1 of 4 workers held: the 3-worker student waits
        time.sleep(0.2)
        order.append("first done")  # 2 + 3 > 4: still waiting
    late.join(timeout=10)
    assert order == ["narrow done", "first done", "wide"]
    with fleet.room(8):  # wider than the fleet: it trains alone
        order.append("alone")
    assert order[-1] == "alone"


def test_students_go_longest_first_onto_the_least_loaded_slot():
    assert assign([1, 5, 2, 2, 4], 2) == [[1, 3], [4, 2, 0]]  # 5+2 and 4+2+1
    assert assign([3, 3, 3], 5) == [[0], [1], [2]]  # never an empty slot
    fleet = Fleet(students=2, workers=2)
    students = [Student(f"s{i}", cost, 1) for i, cost in enumerate([1, 1, 1])] + [Student("wide", 9, 2)]
    assert [[s.key for s in slot] for slot in fleet.slots(students)] == [["s0", "s2"], ["s1"], ["wide"]]
    assert [[s.key for s in slot] for slot in Fleet(1, 2**31).slots(students)] == [["s0", "s1", "s2"], ["wide"]]


def _kill_a_worker_after_a_checkpoint(cfg, killed: list, stop: threading.Event) -> None:
    """Kill (SIGKILL) the Ray Train worker of this test's Ray (one slot) once an unfinished
    student has written a checkpoint; `killed` gets that student's seed."""
    while not stop.is_set():
        for seed in cfg.evaluate.seeds:
            checkpoints = layout.of(cfg, Method.random_real).student_checkpoints(seed)
            if storage.exists(layout.of(cfg, Method.random_real).seed(seed)) or not storage.list_files(checkpoints):
                continue
            workers = [
                p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
            ]
            if len(workers) == 1:
                workers[0].kill()
                killed.append(seed)
                return
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_students_train_at_once_and_a_killed_one_resumes_to_the_same_weights(prepared, tmp_path):
    teacher = teacher_file(tmp_path / "teacher", THREE)

    def config(*extra):
        return method_config(
            imported_config(
                tmp_path / "out",
                teacher,
                THREE,
                "evaluate.seeds=[0,1]",
                "evaluate.epochs=300",  # a checkpoint every 30 epochs, about a second apart
                "evaluate.cpus_per_worker=1",
                "ray.max_failures=1",
                *extra,
            ),
            Method.random_real,
        )

    cfg = config()
    prepared(cfg)
    run_teacher(cfg)
    run_method(cfg, Method.random_real, [s for s in STAGES if s != "evaluate"])
    folder = Path(storage.absolute(layout.of(cfg, Method.random_real).evaluate))

    def seeds() -> list[dict]:
        return [storage.read_json(layout.of(cfg, Method.random_real).seed(s)) for s in (0, 1)]

    def overlap(a: dict, b: dict) -> float:
        return min(a["started"] + a["seconds"], b["started"] + b["seconds"]) - max(a["started"], b["started"])

    together = run_evaluate(cfg, Method.random_real)  # two CPUs: two slots, both students at once
    first = seeds()
    assert overlap(*first) > 0 and all(r["resumed_at"] is None for r in first)

    shutil.rmtree(folder)
    one_at_a_time = config("evaluate.students_at_once=1")  # execution-only: the same stage folder, one slot
    assert layout.of(one_at_a_time, Method.random_real).evaluate == layout.of(cfg, Method.random_real).evaluate
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(one_at_a_time, killed, stop))
    killer.start()
    try:
        in_turn = run_evaluate(one_at_a_time, Method.random_real)
    finally:
        stop.set()
        killer.join(timeout=10)
    second = seeds()
    assert killed, "no worker was killed: the test did not exercise a restart"
    # one slot: one student's epochs all before the other's (both attempts of the killed one)
    first_trained, then = sorted(second, key=lambda r: r["history"][0]["time"])
    assert max(h["time"] for h in first_trained["history"]) < min(h["time"] for h in then["history"])
    (seed,) = killed
    assert second[seed]["resumed_at"] >= 29 and second[1 - seed]["resumed_at"] is None  # from its last checkpoint
    assert in_turn["top1"] == together["top1"]
    for a, b in zip(first, second):
        assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
