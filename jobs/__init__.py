"""Entry points for `ray job submit --working-dir . -- python -m jobs.<command> CONFIG [key=value ...]`.

Each module runs the same code as `tsgd-ray <command>`; inside a Ray job the job's cluster is
joined (RAY_ADDRESS is set by the job), elsewhere a local Ray is started.
"""

import sys


def main(command: str) -> None:
    """Exit with `tsgd-ray <command> sys.argv[1:]`'s exit code."""
    from tsgd_ray.cli import run_command

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m jobs.{command} CONFIG [key=value ...]\n\n{__doc__.strip()}")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    sys.exit(run_command(command, sys.argv[1], sys.argv[2:]))
