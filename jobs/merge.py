"""`ray job submit --working-dir . -- python jobs/merge.py CONFIG [key=value ...]`: the same as `tsgd-ray merge`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
