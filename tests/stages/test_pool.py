"""ElasticPool on real Ray actors: stragglers re-run on idle actors, and stateful actors whose
state is lost have their items redone (nothing counted twice or lost)."""

from __future__ import annotations

import operator
import os
import sys
import time
from pathlib import Path

import pytest

from tsgd_ray.runtime.pool import ElasticPool, PoolError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this file


class Summer:
    """Sums its items; item `slow` sleeps the first time it is ever run (a file marks that)."""

    def __init__(self, flag: str, slow: int = -1, die_on: int = -1):
        self.flag, self.slow, self.die_on, self.total = flag, slow, die_on, 0

    def ready(self) -> bool:
        return True

    def work(self, item: int) -> int:
        if item == self.slow and not os.path.exists(self.flag):
            Path(self.flag).touch()
            time.sleep(60)
        if item == self.die_on and not os.path.exists(self.flag + ".died"):
            Path(self.flag + ".died").touch()
            os._exit(1)  # the actor process dies mid-item
        self.total += item
        return item

    def collect(self) -> int:
        total, self.total = self.total, 0
        return total


def _starter(**kwargs):
    import ray

    return lambda name: ray.remote(Summer).options(name=name, num_cpus=0.25, max_restarts=0).remote(**kwargs)


def test_a_straggler_is_run_again_on_an_idle_actor(ray_session, tmp_path):
    pool = ElasticPool(_starter(flag=str(tmp_path / "slow"), slow=0), 2, f"straggler-{os.getpid()}", 1)
    started = time.time()
    done, _ = pool.run(range(6), lambda actor, i: actor.work.remote(i), speculate=True)
    assert done == {i: i for i in range(6)}
    assert pool.speculated == 1 and time.time() - started < 40  # the 60 s straggler did not hold the stage


def test_a_lost_stateful_actor_has_all_its_items_redone(ray_session, tmp_path):
    pool = ElasticPool(_starter(flag=str(tmp_path / "die"), die_on=7), 2, f"stateful-{os.getpid()}", 2)
    done, total = pool.run(range(10), lambda actor, i: actor.work.remote(i), collect="collect", fold=operator.add)
    assert sorted(done) == list(range(10)) and pool.lost == 1
    assert total == sum(range(10))  # the dead actor's sum was never used; its items were redone


def test_an_item_that_kills_every_actor_stops_the_pool(ray_session, tmp_path):
    class Always(Summer):
        def work(self, item: int) -> int:
            os._exit(1)

    import ray

    pool = ElasticPool(
        lambda name: ray.remote(Always).options(name=name, num_cpus=0.25).remote(str(tmp_path / "x")),
        1,
        f"doomed-{os.getpid()}",
        1,
    )
    with pytest.raises(PoolError, match="item 0 lost 2 actors"):
        pool.run([0], lambda actor, i: actor.work.remote(i))


def test_states_are_folded_as_they_arrive_a_few_at_a_time(ray_session, tmp_path):
    """Five actors hand over their states, at most COLLECT_WINDOW at once, and the driver folds each
    in on arrival: what it holds does not grow with the number of actors."""
    from tsgd_ray.runtime.pool import COLLECT_WINDOW

    class Slow(Summer):
        def work(self, item: int) -> int:
            Path(self.flag, f"up-{os.getpid()}").touch()
            deadline = time.time() + 60  # every actor gets items: wait until all five are up
            while len(list(Path(self.flag).glob("up-*"))) < 5 and time.time() < deadline:
                time.sleep(0.05)
            return super().work(item)

        def collect(self) -> int:
            started = time.time()
            time.sleep(0.5)
            Path(self.flag, f"span-{os.getpid()}").write_text(f"{started} {time.time()}")
            return super().collect()

    import ray

    pool = ElasticPool(
        lambda name: ray.remote(Slow).options(name=name, num_cpus=0.2, max_restarts=0).remote(str(tmp_path)),
        5,
        f"fold-{os.getpid()}",
        1,
    )
    folds = []

    def fold(a: int, b: int) -> int:
        folds.append((a, b))
        return a + b

    done, total = pool.run(range(20), lambda actor, i: actor.work.remote(i), collect="collect", fold=fold)
    spans = [tuple(map(float, p.read_text().split())) for p in tmp_path.glob("span-*")]
    assert total == sum(range(20)) and len(spans) == 5 and len(folds) == 4
    most = max(sum(start < t < end for start, end in spans) for t in [s for s, _ in spans])
    assert most <= COLLECT_WINDOW
