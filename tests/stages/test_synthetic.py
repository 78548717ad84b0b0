"""The distilled set as a product: `SyntheticVideos` reads a merged set by URI, and `tsgd-ray
export` writes it as safetensors, WebDataset shards or MP4 files that read back to the same clips."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import SMALL_RUN

import tsgd_ray
from tsgd_ray import layout, storage
from tsgd_ray.artifacts import load_teacher, read_synthetic
from tsgd_ray.cli import run_command
from tsgd_ray.config import Method, TemporalSampling, load_config, to_yaml
from tsgd_ray.core.clips import to_model_input
from tsgd_ray.methods import method_config
from tsgd_ray.synthetic import ExportError, SyntheticVideos


@pytest.fixture(scope="module")
def merged(finished_run):
    """The merged tsgd set (8 classes x IPC 2) of the session's finished run, and its config."""
    root, _ = finished_run
    return method_config(load_config("default", [f"storage.output_root={root}", *SMALL_RUN]), Method.tsgd)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_synthetic_videos_reads_a_merged_set_by_uri(merged):
    expected, classes = read_synthetic(merged)
    data = tsgd_ray.SyntheticVideos(layout.of(merged).synthetic)
    assert len(data) == 16 and data.classes == classes and data.clip_shape == (8, 32, 32, 3)
    assert torch.equal(data.labels, expected["labels"])
    raw = SyntheticVideos(layout.of(merged).synthetic, normalize=False)
    for i in (0, 7, 15):
        clip, label = raw[i]
        assert clip.dtype == torch.uint8 and torch.equal(clip, expected["clips"][i]) and label == expected["labels"][i]
        x, _ = data[i]
        assert x.shape == (3, 8, 32, 32) and torch.allclose(
            x, to_model_input(clip[None], merged.data.mean, merged.data.std)[0]
        )
    clips, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=16, shuffle=False, num_workers=0)))
    assert clips.shape == (16, 3, 8, 32, 32) and torch.equal(labels, expected["labels"])
    # soft labels from the set's own teacher, found through the manifest
    soft = SyntheticVideos(layout.of(merged).synthetic, soft_labels=True)
    x, label, logits = soft[3]
    teacher = load_teacher(merged, classes)
    with torch.no_grad():
        assert torch.allclose(logits, teacher(x[None])[0], atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_export_round_trips_every_format(merged, tmp_path, capsys):
    from safetensors.torch import load_file

    from tsgd_ray.data.video import decode_clip

    expected, classes = read_synthetic(merged)
    config = tmp_path / "merged.yaml"
    config.write_text(to_yaml(merged))
    outputs = {}
    for fmt in ("safetensors", "webdataset", "mp4"):
        outputs[fmt] = tmp_path / fmt
        assert run_command("export", str(config), [], to=str(outputs[fmt]), fmt=fmt) == 0
        assert "exported 16 videos of 8 classes" in capsys.readouterr().out
        summary = json.loads((outputs[fmt] / "export.json").read_text())
        assert summary["videos"] == 16 and summary["classes"] == classes and summary["format"] == fmt

    tensors = load_file(str(outputs["safetensors"] / "part-00000.safetensors"))
    assert torch.equal(tensors["clips"], expected["clips"]) and torch.equal(tensors["labels"], expected["labels"])

    with tarfile.open(outputs["webdataset"] / "shard-00000.tar") as tar:
        names = tar.getnames()
        assert len(names) == 16 * 5  # clip, class, metadata, and the stored views and logits
        first = np.load(io.BytesIO(tar.extractfile(names[0]).read()))
        assert names[0] == "00000-000.npy" and np.array_equal(first, expected["clips"][0].numpy())
        assert json.loads(tar.extractfile("00000-000.json").read())["class"] == classes[0]

    videos = sorted(outputs["mp4"].glob("*/*.mp4"))
    assert len(videos) == 16 and videos[0].parent.name == classes[0]
    decoded = decode_clip(videos[0].read_bytes(), 8, 32, 32, sampling=TemporalSampling.uniform)
    error = np.mean((decoded.astype(float) - expected["clips"][0].numpy()) ** 2)
    assert decoded.shape == (8, 32, 32, 3) and 10 * np.log10(255**2 / error) > 30  # H.264 crf 18: lossy, close

    # an export never overwrites another; a folder without a merged set is a clear error
    assert run_command("export", str(config), [], to=str(outputs["mp4"]), fmt="mp4") == 2
    assert "already holds an export" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no merged synthetic set at"):
        SyntheticVideos(str(tmp_path))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_set_in_object_storage_reads_and_exports_the_same(merged, s3_root, tmp_path):
    from pathlib import Path

    from conftest import upload_tree
    from safetensors.torch import load_file

    from tsgd_ray.synthetic import export

    upload_tree(Path(layout.of(merged).synthetic), f"{s3_root}/synthetic")
    local, remote = SyntheticVideos(layout.of(merged).synthetic), SyntheticVideos(f"{s3_root}/synthetic/")
    assert len(remote) == len(local) and remote.classes == local.classes
    assert all(torch.equal(remote[i][0], local[i][0]) for i in (0, 9, 15))
    summary = export(f"{s3_root}/synthetic", f"{s3_root}/exported", "safetensors")
    (tmp_path / "part.safetensors").write_bytes(storage.read_bytes(f"{s3_root}/exported/{summary['files'][0]}"))
    assert torch.equal(load_file(str(tmp_path / "part.safetensors"))["labels"], local.labels)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stored_labels_ship_with_the_set_and_train_a_student_without_the_teacher(merged, tmp_path):
    """The distill actors store 16 views per clip with the teacher's logits; SyntheticVideos and
    every export carry them; a student replays them with no teacher in sight."""
    from safetensors.torch import load_file

    from tsgd_ray.core.labels import apply_view
    from tsgd_ray.core.models import build_model
    from tsgd_ray.synthetic import export

    expected, classes = read_synthetic(merged)
    data = SyntheticVideos(layout.of(merged).synthetic, stored_labels=True)
    assert data.stored_views == 16 and data.manifest["stored_labels"]["view_params"][-1] == "reverse"
    x, label, views, logits = data[5]
    assert views.shape == (16, 7) and logits.shape == (16, 8) and logits.dtype == torch.float32
    assert torch.equal(views, expected["view_params"][5]) and torch.equal(logits, expected["logits"][5].float())
    teacher = load_teacher(merged, classes)
    with torch.no_grad():  # each stored logit vector is the teacher's on that view of the stored clip
        on_views = teacher(apply_view(x[None].expand(16, -1, -1, -1, -1), views))
    assert torch.allclose(logits, on_views, atol=2e-2, rtol=1e-2)

    for fmt in ("safetensors", "webdataset", "mp4"):
        export(layout.of(merged).synthetic, str(tmp_path / fmt), fmt)
    part = load_file(str(tmp_path / "safetensors" / "part-00000.safetensors"))
    assert torch.equal(part["view_params"], expected["view_params"]) and torch.equal(part["logits"], expected["logits"])
    with tarfile.open(tmp_path / "webdataset" / "shard-00000.tar") as tar:
        shipped = np.load(io.BytesIO(tar.extractfile("00000-001.logits.npy").read()))
    assert np.array_equal(shipped, expected["logits"][1].numpy())
    beside_mp4 = load_file(str(tmp_path / "mp4" / "labels.safetensors"))
    assert torch.equal(beside_mp4["logits"], expected["logits"])

    torch.manual_seed(0)
    student = build_model("mini_r2plus1d", 8, (8, 32, 32), 8, 2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        for clips, _labels, views, logits in torch.utils.data.DataLoader(data, batch_size=16, shuffle=False):
            view, target = tsgd_ray.replay(clips, views, logits, generator)
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(student(view) / 4, 1), torch.softmax(target / 4, 1), reduction="batchmean"
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    bare = tmp_path / "no-labels-set"  # a set merged with distill.labels.views=0
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({**data.manifest, "stored_labels": None}))
    with pytest.raises(ExportError, match="stores no labels"):
        SyntheticVideos(str(bare), stored_labels=True)
