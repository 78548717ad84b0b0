"""`ray job submit --working-dir . -- python jobs/evaluate.py CONFIG [key=value ...]`: the same as `tsgd-ray evaluate`."""

import sys

from tsgd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
