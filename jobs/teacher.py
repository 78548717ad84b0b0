"""`python -m jobs.teacher CONFIG [key=value ...]`: `tsgd-ray teacher` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("teacher")
