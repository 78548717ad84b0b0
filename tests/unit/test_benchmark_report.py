"""benchmarks/report.py's CpuTally: where the CPU seconds of a process tree went."""

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).parents[2] / "benchmarks" / "report.py"

# Runs in a fresh interpreter, so the tally's tree holds only what it starts (the test process may
# have a local Ray's processes under it). Two children with the marker "-c" in their command line
# burn 1 CPU second each and exit; one started as "-u -c" burns 1 second too.
SCENARIO = """
import importlib.util, json, subprocess, sys
spec = importlib.util.spec_from_file_location("report", {report!r})
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)
BURN = "import time\\nwhile time.process_time() < 1.0:\\n    pass"
with report.CpuTally(sys.executable + " -c", period=0.02) as tally:
    marked = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(2)]
    other = subprocess.Popen([sys.executable, "-u", "-c", BURN])
    assert all(p.wait(timeout=120) == 0 for p in [*marked, other])
print(json.dumps({{"matched": tally.matched, "rest": tally.rest, "wall": tally.wall}}))
"""


def test_cpu_seconds_of_children_that_exit_count_on_their_side(tmp_path):
    """The tally counts the marked children's 2 s as matched and the other child's 1 s, plus the
    scenario process's own polling, as the rest."""
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(report=str(REPORT)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    tally = json.loads(done.stdout.splitlines()[-1])
    assert 1.8 <= tally["matched"] <= 2.3, tally
    assert 0.9 <= tally["rest"] <= 1.6, tally
    assert tally["wall"] >= 1.0
