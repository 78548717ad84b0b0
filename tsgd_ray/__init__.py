"""tsgd-ray: distil video datasets with Temporal Saliency-Guided Distillation on Ray."""

from importlib import metadata

try:
    __version__ = metadata.version("tsgd-ray")
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"
