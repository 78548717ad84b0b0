"""`python -m jobs.evaluate CONFIG [key=value ...]`: `tsgd-ray evaluate` for `ray job submit`."""

from jobs import main

if __name__ == "__main__":
    main("evaluate")
