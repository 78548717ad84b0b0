"""`ray job submit --working-dir . -- python jobs/teacher.py CONFIG [key=value ...]`: the same as `tsgd-ray teacher`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", *sys.argv[1:]]))
