"""Configuration: schema, YAML merge, overrides, and one clear error per user mistake."""

import pytest
from conftest import REPO
from omegaconf.errors import ReadonlyConfigError

from tsgd_ray.cli import main
from tsgd_ray.config import ConfigError, config_hash, config_names, load_config, to_dict

SHIPPED = config_names()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(name)
    assert cfg.data.num_frames >= 2
    expected = {"default": (8, 32), "ucf101": (16, 112), "hmdb51": (16, 112), "kinetics400": (8, 64), "ssv2": (8, 64)}
    assert (cfg.data.num_frames, cfg.data.height) == expected[name]


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "default"])
def test_cluster_configs_put_every_model_stage_on_gpus(name, monkeypatch):
    """The teacher, the statistics probes, recovery and the students all compute on the model:
    a cluster config that leaves one at 0 GPUs trains it on CPU while the budget pays for GPUs."""
    monkeypatch.chdir(REPO)
    cfg = load_config(name)
    assert cfg.data.dataset != "builtin" and cfg.device != "cpu"
    requested = {
        "teacher.gpus_per_worker": cfg.teacher.gpus_per_worker,
        "stats.gpus_per_actor": cfg.stats.gpus_per_actor,
        "distill.gpus_per_actor": cfg.distill.gpus_per_actor,
        "evaluate.gpus_per_worker": cfg.evaluate.gpus_per_worker,
    }
    assert {k: v for k, v in requested.items() if v <= 0} == {}


def test_overrides_merge_over_yaml(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("default", ["data.num_frames=4", "distill.ipc=5", "tsgf.enabled=false"])
    assert (cfg.data.num_frames, cfg.distill.ipc, cfg.tsgf.enabled) == (4, 5, False)
    assert cfg.data.height == 32  # from the YAML, untouched


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("data.num_frame=3", "data.num_frame", "Did you mean: 'num_frames'"),
        ("datta.root=x", "datta", "Did you mean: 'data'"),
        ("data.num_frames=abc", "data.num_frames", "could not be converted"),
        ("data.num_frames=1", "data.num_frames", ">= 2"),
        ("distill.ipc=0", "distill.ipc", "[1, 50]"),
        ("data.sampling=sideways", "data.sampling", "center, random, uniform"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction", "[0, 1]"),
        ("tsgf.spatial_kernel=2", "tsgf.spatial_kernel", "odd"),
        ("tsgf.alpha=[1,2]", "tsgf.alpha", "2*tsgf.window+1"),
        ("data.dataset=ucf101", "data.root", "required"),
        ("storage.output_root=", "storage.output_root", "None"),
        ("device=tpu", "device", "cuda"),
        ("distill.init=motion_window", "distill.init", "stats.init_views >= 2"),
        ("distill.pack=true distill.init=noise", "distill.pack", "noise has none"),
        ("distill.pack=true distill.ipc=13", "distill.pack", "at most 50"),
        ("distill.pack=true data.height=31", "distill.pack", "must be even"),
    ],
)
def test_each_user_error_names_the_full_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split())
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert words in message


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.num_frames"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  num_frams: 8\n")
    with pytest.raises(ConfigError, match=r"^data.num_frams: .*Did you mean: 'num_frames'"):
        load_config(path)


def test_config_is_read_only_and_hash_is_stable():
    a, b = load_config(None, ["seed=3"]), load_config(None, ["seed=3"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["seed=4"]))
    assert config_hash(a, ["data"]) == config_hash(load_config(None, ["seed=4"]), ["data"])
    with pytest.raises(ReadonlyConfigError):
        a.seed = 5
    assert to_dict(a)["data"]["dataset"] == "builtin"  # enums flatten to strings


def test_cli_config_prints_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["config", "ucf101", "distill.ipc=7"]) == 0
    out = capsys.readouterr().out
    assert "ipc: 7" in out and "dataset: ucf101" in out and "num_frames: 16" in out


def test_cli_reports_config_errors_in_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["prepare", "default", "data.num_frames=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tsgd-ray prepare: error: data.num_frames: must be >= 2, got 0"


def test_relative_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory: a relative path must not reach them."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        ["storage.output_root=outputs/run", "data.shards=s3://bucket/shards", "teacher.checkpoint=ckpt/teacher.pt"],
    )
    assert cfg.storage.output_root == str(tmp_path / "outputs" / "run")
    assert cfg.teacher.checkpoint == str(tmp_path / "ckpt" / "teacher.pt")
    assert cfg.data.shards == "s3://bucket/shards" and cfg.storage.cache_root == ""


def test_derived_defaults_are_resolved_at_load_and_shown(tmp_path, monkeypatch, capsys):
    """`tsgd-ray config` (and the MLflow params) show the values the stages use, not empty keys."""
    from tsgd_ray import layout
    from tsgd_ray.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("default", [f"storage.output_root={tmp_path / 'out'}", "distill.actors=3", "tsgf.window=2"])
    assert cfg.data.shards == str(tmp_path / "out" / "shards")
    assert cfg.distill.partitions == 12  # 4 per actor
    assert (cfg.evaluate.model, cfg.evaluate.width, cfg.evaluate.depth) == ("mini_c3d", 16, cfg.teacher.depth)
    assert list(cfg.tsgf.alpha) == [1.0] * 5
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert not (tmp_path / "out").exists()  # resolving creates nothing
    remote = load_config("default", ["storage.output_root=s3://bucket/run", "tracking.tracking_uri=http://mlflow:5000"])
    assert remote.data.shards == "s3://bucket/run/shards" and remote.tracking.tracking_uri == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert load_config("default").tracking.tracking_uri == "http://from-env:5000"
    # where the shards live does not change what a stage computes
    moved = load_config("default", [f"storage.output_root={tmp_path / 'out'}", f"data.shards={tmp_path / 'elsewhere'}"])
    assert (
        layout.keys(moved)["teacher"]
        == layout.keys(load_config("default", [f"storage.output_root={tmp_path / 'out'}"]))["teacher"]
    )
    monkeypatch.chdir(tmp_path)
    assert main(["config", "default", "storage.output_root=out"]) == 0
    shown = capsys.readouterr().out
    assert f"shards: {tmp_path / 'out' / 'shards'}" in shown and "partitions: 8" in shown
