"""`python -m jobs.distill CONFIG [key=value ...]`: `tsgd-ray distill` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("distill")
