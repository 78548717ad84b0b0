"""The evaluation fleet: students queued onto slots, each slot one Ray Train run that trains its
students one after another.

Ray Train's start (controller, worker group, placement group: about 14 s on a small machine) is
paid once per slot instead of once per student. The fleet holds as many slots at once as the room
allows (`Fleet.for_config`); students of one width (Ray Train workers) share slots, longest first
onto the least loaded slot, so the slots end about together. On an autoscaling cluster the room is
what the cluster becomes: each student gets its own slot, a waiting slot shows the autoscaler its
workers (`_Demand`), and slots start as nodes arrive; nothing is asked for once they end, so idle
nodes go.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig

from tsgd_ray.core.device import reserved_gpus

log = logging.getLogger(__name__)

#: how often a waiting slot re-reads the room of an autoscaling cluster (seconds)
REFRESH_S = 2.0


@dataclass(frozen=True)
class Student:
    """One student of the fleet: `key` (unique, e.g. "tsgd/seed-0"), its relative training `cost`
    (clips through the model; balances the slots) and the Ray Train `workers` it trains on."""

    key: str
    cost: float
    workers: int


def assign(costs: Sequence[float], slots: int) -> list[list[int]]:
    """Indices of `costs` split into `slots` lists: longest first onto the least loaded slot (ties:
    the lower index), each list in the order it was filled. Deterministic."""
    loads, out = [0.0] * slots, [[] for _ in range(slots)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(slots), key=lambda s: (loads[s], s))
        out[slot].append(i)
        loads[slot] += costs[i]
    return [s for s in out if s]


class Fleet:
    """The room of the evaluation fleet: at most `students` slots training at once, holding at most
    `workers` Ray Train workers between them (a slot of more workers than that trains alone).
    Bounding it here, not by Ray's queue, keeps a waiting slot from timing out its worker group's
    start. With `grow` (an autoscaling cluster) the room is re-read as nodes arrive: `grow()` gives
    the workers the cluster holds now, and `bundle` is one worker's resources to ask the
    autoscaler for."""

    def __init__(self, students: int, workers: int, grow: Optional[Callable[[], int]] = None, bundle=None):
        self.students, self.workers = students, workers
        self._grow, self._bundle = grow, bundle
        self._busy = [0, 0]  # slots, workers
        self._free = threading.Condition()

    @classmethod
    def for_config(cls, cfg: DictConfig) -> "Fleet":
        """Room for evaluate.students_at_once slots whatever their workers (Ray, and an
        autoscaler, place them), or (0) for as many student workers as the cluster's CPUs and GPUs
        hold now (at least one), growing as an autoscaler adds nodes. A source decoding live keeps
        one CPU for Ray Data, whose decode tasks would otherwise wait for ever behind the students."""
        import ray

        from tsgd_ray.runtime.cluster import autoscales

        e = cfg.evaluate
        if e.students_at_once:
            return cls(int(e.students_at_once), 2**31)
        gpus = reserved_gpus(cfg.device, e.gpus_per_worker)
        kept = 0 if cfg.data.clip_cache else 1

        def holds() -> int:
            have = ray.cluster_resources()
            fits = [(have.get("CPU", 0) - kept) / e.cpus_per_worker]
            if gpus:
                fits.append(have.get("GPU", 0) / gpus)
            return max(1, int(min(fits) + 1e-9))

        workers = holds()
        if not autoscales():
            return cls(workers, workers)
        return cls(workers, workers, holds, {"CPU": e.cpus_per_worker, **({"GPU": gpus} if gpus else {})})

    @contextlib.contextmanager
    def room(self, workers: int):
        """Hold room for one slot of `workers` workers while inside (waits for it; on an
        autoscaling cluster the room is re-read every REFRESH_S while the slot's `_Demand` waits)."""
        need = min(workers, self.workers) if self._grow is None else workers
        demand = _Demand(self._bundle, need) if self._grow else None
        try:
            with self._free:
                while not self._free.wait_for(lambda: self._fits(need), timeout=REFRESH_S if demand else None):
                    demand.tick()
                    held = self._grow()
                    if held > self.workers:
                        log.info("evaluate: the fleet widens to %d student workers as nodes arrive", held)
                        self.students = self.workers = held
                self._busy[0] += 1
                self._busy[1] += need
        finally:
            if demand:
                demand.close()
        try:
            yield
        finally:
            with self._free:
                self._busy[0] -= 1
                self._busy[1] -= need
                self._free.notify_all()

    def _fits(self, need: int) -> bool:
        return self._busy[0] < self.students and self._busy[1] + need <= self.workers

    def slots(self, students: Sequence[Student]) -> list[list[Student]]:
        """`students` as slots: per width, as many slots as the room trains at once (at most one
        per student; on an autoscaling cluster one per student), filled by `assign`; widths in the
        order they first appear."""
        out = []
        for workers in dict.fromkeys(s.workers for s in students):
            group = [s for s in students if s.workers == workers]
            width = len(group) if self._grow else min(len(group), self.students, max(1, self.workers // workers))
            out += [[group[i] for i in slot] for slot in assign([s.cost for s in group], width)]
        return out

    def run(self, slots: Sequence[Sequence[Student]], train: Callable[[int, Sequence[Student]], None]) -> None:
        """train(index, slot) for every slot, each in a thread of its own while it has room; returns
        when all have ended, raising the first failure (an interrupt does not wait for the others)."""
        if not slots:
            return

        def one(index: int) -> None:
            with self.room(max(s.workers for s in slots[index])):
                train(index, slots[index])

        pool = ThreadPoolExecutor(len(slots), thread_name_prefix="fleet-slot")
        try:
            for done in [pool.submit(one, i) for i in range(len(slots))]:
                done.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


class _Demand:
    """A waiting slot's workers shown to the autoscaler as a placement group of their bundles:
    pending, it is demand the autoscaler adds nodes for, each group on its own (the autoscaler meets
    `request_resources` all or not at all, so asking for every student at once past the cluster's
    largest size would add nothing). Placed, it is handed back at once, so the slot's own Ray Train
    run can take the node; `tick` asks again while the slot still waits."""

    def __init__(self, bundle: dict, workers: int):
        self.bundles = [bundle] * workers
        self.group, self.placed = None, None

    def tick(self) -> None:
        import ray
        from ray.util.placement_group import placement_group

        if self.group is None:
            self.group = placement_group(self.bundles, strategy="PACK")
            self.placed = self.group.ready()
        elif ray.wait([self.placed], timeout=0)[0]:
            self.close()

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.group is not None:
            remove_placement_group(self.group)
            self.group = self.placed = None
