"""benchmarks/report.py's CpuTally: where the CPU seconds of a process tree went."""

import importlib.util
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("report", Path(__file__).parents[2] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

BURN = "import time\nwhile time.process_time() < 1.0:\n    pass"


def test_cpu_seconds_of_children_that_exit_count_on_their_side():
    """Two children with a marker in their command line each burn 1 CPU second and exit; one
    without the marker burns 1 second too. The tally counts 2 s matched and 1 s (plus this
    process's polling) in the rest."""
    with report.CpuTally(f"{sys.executable} -c", period=0.02) as tally:
        marked = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]
        other = subprocess.Popen([sys.executable, "-u", "-c", BURN])
        assert all(p.wait(timeout=120) == 0 for p in [*marked, other])
    assert 1.8 <= tally.matched <= 2.3, tally.matched
    assert 0.9 <= tally.rest <= 1.6, tally.rest
    assert tally.wall >= 1.0
