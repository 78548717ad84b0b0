"""`ray job submit --working-dir . -- python jobs/export.py CONFIG [key=value ...]`: the same as `tsgd-ray export`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
