"""`python -m jobs.run CONFIG [key=value ...]`: `tsgd-ray run` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("run")
