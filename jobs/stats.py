"""`python -m jobs.stats CONFIG [key=value ...]`: `tsgd-ray stats` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("stats")
