"""`ray job submit --working-dir . -- python jobs/stats.py CONFIG [key=value ...]`: the same as `tsgd-ray stats`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
