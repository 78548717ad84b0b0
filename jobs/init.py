"""`ray job submit --working-dir . -- python jobs/init.py CONFIG [key=value ...]`: the same as `tsgd-ray init`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["init", *sys.argv[1:]]))
