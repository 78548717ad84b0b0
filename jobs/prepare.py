"""`ray job submit --working-dir . -- python jobs/prepare.py CONFIG [key=value ...]`: the same as `tsgd-ray prepare`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
