"""`ray job submit --working-dir . -- python -m jobs.prepare CONFIG [key=value ...]`.

The same code path as `tsgd-ray prepare`; inside a Ray job the job's cluster is joined.
"""

import sys

from tsgd_ray.cli import run_command

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(run_command("prepare", sys.argv[1], sys.argv[2:]))
