"""`ray job submit --working-dir . -- python jobs/run.py CONFIG [key=value ...]`: the same as `tsgd-ray run`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
