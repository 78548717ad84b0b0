"""The stages of a run, side by side over the run layout; `pipeline` runs them in order."""
