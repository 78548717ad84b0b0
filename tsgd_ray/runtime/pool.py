"""A pool of Ray actors that takes work items one at a time and survives losing actors and nodes.

- An item whose actor dies goes back to the front of the queue at once, for whichever actor is free
  next; a replacement actor is requested but never waited for (it joins when Ray can place it, so
  losing a node that the autoscaler does not replace only shrinks the pool).
- Actors are started with no Ray-level restarts or task retries: a retry on a dead actor would hold
  its item until the actor came back.
- `speculate`: once the queue is empty, an idle actor re-runs the item that has been running longest,
  if it has run more than SLOW_FACTOR x the median item time; the first result wins (items must be
  idempotent and write-once, so the loser is harmless).
- `collect`: for actors that accumulate state over their items (the statistics probes), each actor
  is asked once at the end for its state, which it hands over and resets; if it dies before, every
  item it did goes back to the queue, and nothing it held is used. States are folded into one as
  they arrive, at most COLLECT_WINDOW asked for at a time: the driver holds the running result and
  one state, whatever the number of actors.
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
from typing import Any, Callable, Hashable, Optional, Sequence

from tsgd_ray.errors import UserError

log = logging.getLogger(__name__)

SLOW_FACTOR = 2.0
WAIT_WARNING_SECONDS = 60.0
MIN_SPECULATE_SECONDS = 1.0
COLLECT_WINDOW = 1  # states being handed over at once: the driver holds the running one and one more


def actor_starter(actor_class: type, cpus: float, gpus: float, *args) -> Callable[[str], Any]:
    """A `start(name)` for ElasticPool: `actor_class(*args)` with these resources and no Ray-level
    restarts or task retries (the pool replaces lost actors itself)."""
    import ray

    options: dict = {"num_cpus": cpus, "max_restarts": 0, "max_task_retries": 0}
    if gpus:
        options["num_gpus"] = gpus
    return lambda name: ray.remote(actor_class).options(name=name, **options).remote(*args)


class PoolError(UserError, RuntimeError):
    """An item failed on more actors than allowed; the message names it and the last error."""


class PoolActor:
    """Base of the pool's actors: subclasses load what they hold in `setup(*args)`.

    A UserError in `setup` (no teacher yet, a GPU torch cannot use) is kept and raised by
    `ready()`: the driver then gets the error itself (Ray keeps only the text of an error raised in
    an actor's __init__) and the pool does not restart actors for an error a restart cannot fix.
    """

    def __init__(self, *args: Any) -> None:
        self._setup_error: Optional[UserError] = None
        try:
            self.setup(*args)
        except UserError as exc:
            self._setup_error = exc

    def setup(self, *args: Any) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once set up; raises the setup's UserError."""
        if self._setup_error is not None:
            raise self._setup_error
        return True


class ElasticPool:
    """Actors made by `start(name)` (an ActorHandle with a `ready()` method), `size` at a time.

    `max_failures`: how many lost actors one item may cost before the pool gives up.
    """

    def __init__(self, start: Callable[[str], Any], size: int, name: str, max_failures: int):
        self._start, self.size, self.name, self.max_failures = start, size, name, max_failures
        self.actors: dict[int, Any] = {}
        self.generation: collections.Counter = collections.Counter()
        self.lost = 0
        self.speculated = 0

    def _launch(self, slot: int, starting: dict) -> None:
        name = f"{self.name}-{slot}" + (f"-r{self.generation[slot]}" if self.generation[slot] else "")
        self.actors[slot] = self._start(name)
        starting[self.actors[slot].ready.remote()] = slot

    def run(
        self,
        items: Sequence[Hashable],
        call: Callable[[Any, Hashable], Any],
        on_result: Optional[Callable[[Hashable, Any], None]] = None,
        speculate: bool = False,
        collect: Optional[str] = None,
        fold: Optional[Callable[[Any, Any], Any]] = None,
    ) -> tuple[dict, Any]:
        """Run `call(actor, item)` (returns an ObjectRef) for every item; returns ({item: result},
        folded) where, with `collect`, folded = fold(...fold(s1, s2)..., sn) over the states
        `actor.<collect>()` of every actor that did items, in the order they arrive (so `fold` must be
        associative and commutative); without `collect`, None.

        Raises:
            PoolError: an item lost more than max_failures actors.
        """
        import ray
        from ray.exceptions import RayActorError

        pending = collections.deque(items)
        done: dict = {}
        done_by: dict[int, list] = collections.defaultdict(list)  # slot -> items whose result it holds
        in_flight: dict = {}  # ref -> (slot, item, started)
        starting: dict = {}  # ready ref -> slot
        idle: list[int] = []
        failures: collections.Counter = collections.Counter()
        durations: list[float] = []
        if collect and fold is None:
            raise ValueError("collect needs a fold")
        folded: Any = None
        failed_starts = 0
        for slot in range(min(self.size, len(items)) or 1):
            self._launch(slot, starting)

        def lose(slot: int, item: Optional[Hashable], exc: BaseException) -> None:
            self.lost += 1
            redo = done_by.pop(slot, []) if collect else []
            for it in redo:
                done.pop(it, None)
            if item is not None and item not in done:
                failures[item] += 1
                if failures[item] > self.max_failures:
                    raise PoolError(
                        f"{self.name}: item {item} lost {failures[item]} actors; last error: {exc}"
                    ) from exc
                redo.append(item)
            pending.extendleft(reversed([it for it in redo if it not in pending]))
            log.warning(
                "%s: actor %d lost (%s); %d item(s) back in the queue, a replacement requested",
                self.name,
                slot,
                type(exc).__name__,
                len(redo),
            )
            self.generation[slot] += 1
            self._launch(slot, starting)

        try:
            while True:
                while len(done) < len(items):
                    while idle and pending:
                        item = pending.popleft()
                        if item in done or any(i == item for _, i, _ in in_flight.values()):
                            continue
                        slot = idle.pop()
                        in_flight[call(self.actors[slot], item)] = (slot, item, time.time())
                    if speculate and idle and not pending and durations:
                        self._speculate(idle, in_flight, durations, call)
                    if not in_flight and not starting:
                        raise PoolError(f"{self.name}: no actor left and {len(items) - len(done)} item(s) to do")
                    # poll while an idle actor may take a straggler; else wake up now and then to say
                    # that no actor can be placed (e.g. it asks for a GPU no node has)
                    poll = 1.0 if speculate and idle and not pending and durations else WAIT_WARNING_SECONDS
                    ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=poll)
                    if not ready:
                        if not in_flight:
                            log.warning(
                                "%s: waiting for Ray to place %d actor(s) (no node has the resources they "
                                "ask for yet: check the stage's gpus_per_actor / cpus_per_actor)",
                                self.name,
                                len(starting),
                            )
                        continue
                    ref = ready[0]
                    if ref in starting:
                        slot = starting.pop(ref)
                        try:
                            ray.get(ref)
                            idle.append(slot)
                        except RayActorError as exc:
                            failed_starts += 1
                            if failed_starts > self.max_failures * self.size:
                                raise PoolError(
                                    f"{self.name}: {failed_starts} actors died while starting; last error: {exc}"
                                ) from exc
                            lose(slot, None, exc)
                        continue
                    slot, item, started = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayActorError as exc:
                        if any(i == item for _, i, _ in in_flight.values()):
                            failures[item] += 1  # a speculative twin still runs it
                            item = None
                        lose(slot, item, exc)
                        continue
                    idle.append(slot)
                    if item in done:
                        continue  # the twin of a speculated item: the first result won
                    done[item] = result
                    done_by[slot].append(item)
                    durations.append(time.time() - started)
                    if on_result:
                        on_result(item, result)
                if not collect:
                    return done, None
                folded = self._collect(collect, fold, folded, done_by, lose)
                if len(done) == len(items):
                    return done, folded
        finally:
            for actor in self.actors.values():
                ray.kill(actor)

    def _speculate(self, idle: list, in_flight: dict, durations: list, call) -> None:
        threshold = max(MIN_SPECULATE_SECONDS, SLOW_FACTOR * statistics.median(durations))
        running = collections.Counter(item for _, item, _ in in_flight.values())
        now = time.time()
        slow = sorted(
            (started, item)
            for _, item, started in in_flight.values()
            if running[item] == 1 and now - started > threshold
        )
        if slow:
            item = slow[0][1]
            slot = idle.pop()
            in_flight[call(self.actors[slot], item)] = (slot, item, now)
            self.speculated += 1
            log.info(
                "%s: item %s runs %.0f s (median %.1f s); started again on actor %d",
                self.name,
                item,
                now - slow[0][0],
                statistics.median(durations),
                slot,
            )

    def _collect(self, method: str, fold: Callable, folded: Any, done_by: dict, lose) -> Any:
        """`folded` with each actor's state folded in, COLLECT_WINDOW states asked for at a time; an
        actor lost now has its items put back (by `lose`) and nothing of it is folded."""
        import ray
        from ray.exceptions import RayActorError

        slots = collections.deque(slot for slot in list(done_by) if done_by[slot])
        asked: dict = {}  # ref -> slot
        while slots or asked:
            while slots and len(asked) < COLLECT_WINDOW:
                slot = slots.popleft()
                asked[getattr(self.actors[slot], method).remote()] = slot
            ready, _ = ray.wait(list(asked), num_returns=1, timeout=WAIT_WARNING_SECONDS)
            if not ready:
                log.warning("%s: waiting for %d actor(s) to hand over their state", self.name, len(asked))
                continue
            slot = asked.pop(ready[0])
            try:
                state = ray.get(ready[0])
            except RayActorError as exc:
                lose(slot, None, exc)
                continue
            folded = state if folded is None else fold(folded, state)
            done_by[slot] = []  # handed over: losing this actor later costs none of them
            del state
        return folded
