"""The one line per target that every benchmark ends with, in a form a script can read:

target <name>: <value> (goal <op> <threshold>) met
target <name>: <value> (goal <op> <threshold>) NOT met
"""

from __future__ import annotations


def target_line(name: str, value: float, op: str, threshold: float, digits: int = 2) -> str:
    """`op` is one of <=, >=, <, >."""
    met = {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold, ">": value > threshold}[op]
    return f"target {name}: {value:.{digits}f} (goal {op} {threshold}) {'met' if met else 'NOT met'}"


def target(name: str, value: float, op: str, threshold: float, digits: int = 2) -> None:
    print(target_line(name, value, op, threshold, digits), flush=True)


#: overrides for a run of a few seconds per stage on the built-in data (benchmarks that run every
#: stage once to check or time it, not to measure quality)
TINY_RUN = (
    "data.builtin.train_per_class=4",
    "data.builtin.test_per_class=2",
    "teacher.epochs=1",
    "distill.iterations=2",
    "evaluate.epochs=1",
    "evaluate.seeds=[0]",
    "evaluate.draws=1",  # the default config's three draws need 9 clips per class
    "evaluate.baselines=[]",
)


class CpuTally:
    """CPU seconds spent by this process and every process under it (a local Ray's GCS, raylet
    and workers) while open, split into the processes whose title starts with `prefix` (say
    "ray::PartitionWorker") and the rest. A background thread reads every process each `period`
    seconds and keeps its last reading, so a process that exits counts up to its last read.

        with CpuTally("ray::PartitionWorker") as tally:
            ...
        tally.matched, tally.rest, tally.wall  # seconds
    """

    def __init__(self, prefix: str, period: float = 0.25):
        import psutil

        self.prefix, self.period, self._me = prefix, period, psutil.Process()
        self._first: dict[tuple, float] = {}  # (pid, created) -> CPU seconds when first seen (0 if born later)
        self._last: dict[tuple, tuple[bool, float]] = {}  # -> (title matches, CPU seconds at the last read)
        self.matched = self.rest = self.wall = 0.0

    def _read(self, baseline: bool = False) -> None:
        import psutil

        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                with p.oneshot():
                    key, times, title = (p.pid, p.create_time()), p.cpu_times(), " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            seconds = times.user + times.system
            self._first.setdefault(key, seconds if baseline else 0.0)
            self._last[key] = (title.startswith(self.prefix), seconds)

    def _poll(self) -> None:
        while not self._stop.wait(self.period):
            self._read()

    def __enter__(self) -> "CpuTally":
        import threading
        import time

        self._read(baseline=True)
        self._started, self._stop = time.perf_counter(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import time

        self._stop.set()
        self._thread.join()
        self._read()
        self.wall = time.perf_counter() - self._started
        for key, (matches, seconds) in self._last.items():
            spent = seconds - self._first[key]
            self.matched, self.rest = (
                (self.matched + spent, self.rest) if matches else (self.matched, self.rest + spent)
            )
