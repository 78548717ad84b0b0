"""Entry points for `ray job submit`: `python -m jobs.<command> CONFIG [key=value ...]`."""
