"""`python -m jobs.merge CONFIG [key=value ...]`: `tsgd-ray merge` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("merge")
