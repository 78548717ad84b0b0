"""`python -m jobs.prepare CONFIG [key=value ...]`: `tsgd-ray prepare` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("prepare")
