"""`python -m tsgd_ray <command> CONFIG [key=value ...]`: the `tsgd-ray` program, for `ray job submit`
(the job's driver joins the job's cluster through RAY_ADDRESS)."""

import sys

from tsgd_ray.cli import main

sys.exit(main())
