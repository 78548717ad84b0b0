"""`ray job submit --working-dir . -- python jobs/distill.py CONFIG [key=value ...]`: the same as `tsgd-ray distill`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
