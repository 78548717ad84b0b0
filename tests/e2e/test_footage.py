"""Real footage (H.264, MPEG-2 PS, MS-MPEG4v3, Cinepak with irregular timestamps) through the pipeline.

The files come from scripts/fetch_footage.py into a cache outside the repo; each test skips with the
reason when its file is not there (CI fills the cache first).
"""

import importlib.util
import shutil

import numpy as np
import pytest
from conftest import REPO, tiny_config

from tsgd_ray.config import TemporalSampling
from tsgd_ray.data.pipeline import ClipDecoder, ClipStream, clip_dataset, expected_rows
from tsgd_ray.data.video import decode_clip, probe
from tsgd_ray.stages.prepare import run_prepare

_spec = importlib.util.spec_from_file_location("fetch_footage", REPO / "scripts" / "fetch_footage.py")
fetch_footage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_footage)
CACHE = fetch_footage.default_cache()

# name -> (height, width, frames the decoder finds)
EXPECTED = {
    "bikes.mp4": (272, 640, 250),
    "carphone_pristine.mp4": (144, 176, 120),
    "carphone_distorted.mp4": (144, 176, 120),
    "cityCC0.mpg": (405, 720, 190),
    "vtest.avi": (576, 768, 795),
    "tree.avi": (240, 320, 68),  # the header promises 444 frames; 68 are coded
}


def _footage(name):
    path = CACHE / name
    if not path.is_file():
        pytest.skip(f"{path} is not in the footage cache: run python scripts/fetch_footage.py")
    return path.read_bytes()


@pytest.mark.footage
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_real_file_probes_and_decodes(name):
    data = _footage(name)
    info = probe(data)
    assert (info.height, info.width, info.num_frames) == EXPECTED[name]
    decoder = ClipDecoder(num_frames=16, height=112, width=112, interval=2, sampling="uniform")
    out = decoder({"video_id": np.array([name]), "label": np.array([0]), "video": np.array([data], dtype=object)})
    assert out["ok"].tolist() == [True], out["error"]
    clip = out["clip"][0]
    assert clip.shape == (16, 112, 112, 3) and clip.std() > 5
    assert np.abs(np.diff(clip.astype(np.int16), axis=0)).mean() > 0.5  # real footage moves


@pytest.mark.footage
def test_irregular_timestamps_sample_only_frames_that_exist():
    data = _footage("tree.avi")
    last = decode_clip(data, 4, 64, 64, sampling=TemporalSampling.uniform)[-1]
    assert last.std() > 5  # the last sampled frame is index 67, a real frame, not padding


@pytest.mark.footage
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_footage_folder_through_prepare_and_ray_data(tmp_path, ray_session):
    for name in EXPECTED:
        _footage(name)
    root = tmp_path / "footage"
    for i, name in enumerate(sorted(EXPECTED)):
        (root / "train" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(CACHE / name, root / "train" / f"class{i % 2}" / name)
    cfg = tiny_config(
        tmp_path / "out",
        "data.dataset=folder",
        f"data.root={root}",
        "data.transcode_short_side=64",
        "data.max_bad_fraction=0",
    )
    manifest = run_prepare(cfg)
    assert manifest["skipped"] == [] and manifest["num_videos"] == 6
    stream = ClipStream(clip_dataset(cfg, "train"), expected_rows(cfg, "train"), 0.0, batch_size=3)
    clips = [c for batch in stream for c in batch["clip"]]
    assert len(clips) == 6 and stream.bad == []
