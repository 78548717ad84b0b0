"""tsgd-ray: distil video datasets with Temporal Saliency-Guided Distillation on Ray.

`tsgd_ray.SyntheticVideos(uri)` reads a distilled set as a torch Dataset (see tsgd_ray.synthetic);
`tsgd_ray.replay(clips, view_params, logits, generator)` applies one of its stored views per clip.
"""

from importlib import metadata

try:
    __version__ = metadata.version("tsgd-ray")
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name == "SyntheticVideos":  # imported on first use: `import tsgd_ray` stays light
        from tsgd_ray.synthetic import SyntheticVideos

        return SyntheticVideos
    if name == "replay":
        from tsgd_ray.core.labels import replay

        return replay
    raise AttributeError(f"module 'tsgd_ray' has no attribute {name!r}")
