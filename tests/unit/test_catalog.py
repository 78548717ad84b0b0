"""Catalogs of the real dataset layouts, built over fixture trees of real encoded videos."""

import json

import pytest
from conftest import UCF_CLASSES, make_ucf101_tree, tiny_config, write_video

from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs import CATALOGS, CatalogError, build_catalog


def cfg_for(tmp_path, dataset, root, *overrides):
    return tiny_config(tmp_path / "out", f"data.dataset={dataset}", f"data.root={root}", *overrides)


def ucf101_layout(tmp_path):
    make_ucf101_tree(tmp_path / "ucf")
    catalog = build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf"))
    assert catalog.classes == UCF_CLASSES
    assert catalog.counts() == {"train": {c: 3 for c in UCF_CLASSES}, "test": {c: 2 for c in UCF_CLASSES}}
    by_id = {r.video_id: r for r in catalog.records}
    hsp = by_id["UCF-101/HandstandPushups/v_HandStandPushups_g08_c01"]  # UCF's real case quirk
    assert (hsp.label, hsp.class_name, hsp.split) == (2, "HandstandPushups", "train")
    assert all(r.uri.endswith(".avi") for r in catalog.records)
    assert catalog.skipped == []


def test_ucf101_restricted_classes_are_relabelled(tmp_path):
    make_ucf101_tree(tmp_path / "ucf")
    catalog = build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf", "data.classes=[HandstandPushups,archery]"))
    assert catalog.classes == ["Archery", "HandstandPushups"]  # dataset order, any case accepted
    assert {(r.class_name, r.label) for r in catalog.records} == {("Archery", 0), ("HandstandPushups", 1)}
    with pytest.raises(CatalogError, match=r"data.classes: 1 name\(s\) are not classes of the dataset: \['Juggling'\]"):
        build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf", "data.classes=[Archery,Juggling]"))


def test_missing_files_stop_with_examples_or_are_skipped_and_counted(tmp_path):
    lists = make_ucf101_tree(tmp_path / "ucf")
    for rel in lists["train"][:2]:
        (tmp_path / "ucf" / "UCF-101" / rel).unlink()
    with pytest.raises(CatalogError) as info:
        build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf"))
    message = str(info.value)
    assert "2 catalog problem(s)" in message and lists["train"][0] in message and "on_catalog_error=skip" in message
    catalog = build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf", "data.on_catalog_error=skip"))
    assert len(catalog.records) == 15 - 2
    assert [s["reason"] for s in catalog.skipped] == ["missing file", "missing file"]
    # reported where the file was expected: in UCF-101/, beside its class's other videos
    assert sorted(s["uri"] for s in catalog.skipped) == sorted(
        str(tmp_path / "ucf" / "UCF-101" / r) for r in lists["train"][:2]
    )


def test_unknown_label_is_reported(tmp_path):
    make_ucf101_tree(tmp_path / "ucf")
    with open(tmp_path / "ucf" / "ucfTrainTestlist" / "trainlist01.txt", "a") as f:
        f.write("Juggling/v_Juggling_g01_c01.avi 9\n")
    with pytest.raises(CatalogError, match="unknown label 'Juggling'"):
        build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf"))


def test_ucf101_other_split_and_missing_annotations(tmp_path):
    make_ucf101_tree(tmp_path / "ucf")
    (tmp_path / "ucf" / "ucfTrainTestlist" / "testlist02.txt").write_text("Archery/v_Archery_g01_c01.avi\n")
    catalog = build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf", "data.split_id=2"))
    assert catalog.counts()["test"] == {"Archery": 1}
    with pytest.raises(CatalogError, match="annotation file not found: .*classInd.txt"):
        build_catalog(cfg_for(tmp_path, "ucf101", tmp_path / "ucf", f"data.annotations={tmp_path / 'nowhere'}"))


def hmdb51_layout(tmp_path):
    root = tmp_path / "hmdb"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for c in ("brush_hair", "cartwheel"):
        lines = []
        for i, tag in enumerate([1, 1, 2, 0]):
            name = f"{c}_clip_{i}.avi"
            write_video(root / "hmdb51_org" / c / name, codec="mpeg4", seed=i)
            lines.append(f"{name} {tag} \n")
        for k in (1, 2, 3):
            (splits / f"{c}_test_split{k}.txt").write_text("".join(lines))
    catalog = build_catalog(cfg_for(tmp_path, "hmdb51", root))
    assert catalog.classes == ["brush_hair", "cartwheel"]
    assert catalog.counts() == {"train": {"brush_hair": 2, "cartwheel": 2}, "test": {"brush_hair": 1, "cartwheel": 1}}
    assert not any("clip_3" in r.uri for r in catalog.records)  # tag 0: unused in this split


def kinetics_layout(tmp_path):
    root = tmp_path / "k400"
    write_video(root / "train" / "playing guitar" / "abcdefghijk_000010_000020.mp4")
    write_video(root / "train" / "yoga" / "AAAAAAAAAAA_000000_000010.mp4")
    write_video(root / "val" / "Bbbbbbbbbbb_000005_000015.mp4")  # flat layout
    ann = root / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "playing guitar,abcdefghijk,10,20,train,0\n"
        "yoga,AAAAAAAAAAA,0,10,train,0\n"
        "yoga,MISSINGMISS,3,13,train,0\n"
    )
    (ann / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\nyoga,Bbbbbbbbbbb,5,15,val\n")
    (ann / "test.csv").write_text("youtube_id,time_start,time_end,split\nZzzzzzzzzzz,0,10,test\n")
    with pytest.raises(CatalogError, match="MISSINGMISS_000003_000013: missing file"):
        build_catalog(cfg_for(tmp_path, "kinetics", root, f"data.annotations={ann}"))
    catalog = build_catalog(
        cfg_for(tmp_path, "kinetics", root, f"data.annotations={ann}", "data.on_catalog_error=skip")
    )
    assert catalog.classes == ["playing guitar", "yoga"]
    assert catalog.counts() == {"train": {"playing guitar": 1, "yoga": 1}, "val": {"yoga": 1}}
    assert len(catalog.skipped) == 1


def ssv2_layout(tmp_path):
    root = tmp_path / "ssv2"
    labels = {"Pushing something from left to right": "1", "Approaching something with your camera": "0"}
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "labels.json").write_text(json.dumps(labels))
    train = [
        {
            "id": "101",
            "label": "pushing a cup from left to right",
            "template": "Pushing [something] from left to right",
            "placeholders": ["a cup"],
        },
        {
            "id": "102",
            "label": "approaching a tree",
            "template": "Approaching [something] with your camera",
            "placeholders": ["a tree"],
        },
    ]
    val = [
        {
            "id": "201",
            "label": "pushing pen",
            "template": "Pushing [something] from left to right",
            "placeholders": ["pen"],
        }
    ]
    (root / "labels" / "train.json").write_text(json.dumps(train))
    (root / "labels" / "validation.json").write_text(json.dumps(val))
    for vid in ("101", "102", "201"):
        write_video(root / "videos" / f"{vid}.webm", codec="libvpx-vp9")
    catalog = build_catalog(cfg_for(tmp_path, "ssv2", root / "videos", f"data.annotations={root / 'labels'}"))
    assert catalog.classes == ["Approaching something with your camera", "Pushing something from left to right"]
    assert {(r.video_id, r.label, r.split) for r in catalog.records} == {
        ("101", 1, "train"),
        ("102", 0, "train"),
        ("201", 1, "val"),
    }


def csv_layout(tmp_path):
    root = tmp_path / "mine"
    write_video(root / "clips" / "a.mp4")
    write_video(root / "clips" / "b.mkv")
    (root / "list.csv").write_text(
        "path,label,split\nclips/a.mp4,wave,train\nclips/b.mkv,jump,test\nclips/c.mp4,wave,train\n"
    )
    cfg = cfg_for(tmp_path, "csv", root, f"data.annotations={root / 'list.csv'}", "data.on_catalog_error=skip")
    catalog = build_catalog(cfg)
    assert catalog.classes == ["jump", "wave"]
    assert {(r.video_id, r.class_name, r.split) for r in catalog.records} == {
        ("clips/a", "wave", "train"),
        ("clips/b", "jump", "test"),
    }
    assert catalog.skipped[0]["uri"].endswith("clips/c.mp4")


def folder_layout(tmp_path, with_splits):
    root = tmp_path / "folders"
    prefix = ["train/", "test/"] if with_splits else ["", ""]
    write_video(root / f"{prefix[0]}run" / "1.mp4")
    write_video(root / f"{prefix[0]}walk" / "2.avi", codec="mpeg4")
    write_video(root / f"{prefix[1]}walk" / "3.mov")
    (root / "README.txt").write_text("not a video")
    catalog = build_catalog(cfg_for(tmp_path, "folder", root))
    assert catalog.classes == ["run", "walk"]
    expected = (
        {"train": {"run": 1, "walk": 1}, "test": {"walk": 1}} if with_splits else {"train": {"run": 1, "walk": 2}}
    )
    assert catalog.counts() == expected


def test_ucf101_in_s3(tmp_path, s3_root):
    from conftest import upload_tree

    make_ucf101_tree(tmp_path / "ucf")
    upload_tree(tmp_path / "ucf", s3_root)
    catalog = build_catalog(cfg_for(tmp_path, "ucf101", s3_root))
    assert len(catalog.records) == 15 and all(r.uri.startswith(s3_root + "/UCF-101/") for r in catalog.records)


# each registered catalog's tiny generated layout (real encoded videos), and what it must read there
LAYOUTS = {
    DatasetKind.ucf101: [ucf101_layout],
    DatasetKind.hmdb51: [hmdb51_layout],
    DatasetKind.kinetics: [kinetics_layout],
    DatasetKind.ssv2: [ssv2_layout],
    DatasetKind.csv: [csv_layout],
    DatasetKind.folder: [
        lambda tmp_path: folder_layout(tmp_path / "split", True),
        lambda tmp_path: folder_layout(tmp_path / "flat", False),
    ],
}


def test_every_dataset_kind_has_a_catalog():
    assert set(CATALOGS) == set(DatasetKind) - {DatasetKind.builtin}  # builtin: a generated class-folder tree


@pytest.mark.parametrize("kind", sorted(CATALOGS, key=lambda k: k.value), ids=lambda k: k.value)
def test_every_registered_catalog_reads_a_tiny_generated_layout(kind, tmp_path):
    assert kind in LAYOUTS, f"catalog {kind.value} is registered without a tiny layout here"
    for layout in LAYOUTS[kind]:
        layout(tmp_path)
