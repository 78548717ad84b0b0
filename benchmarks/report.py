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
    "evaluate.baselines=[]",
)
