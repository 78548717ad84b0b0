"""The methods registry keeps the baselines honest in every shipped config: random_real is real
clips as drawn (never packed, never edited), and where the run packs, packed_real (packing alone)
is a baseline beside it."""

from __future__ import annotations

import pytest

from tsgd_ray import layout, methods
from tsgd_ray.config import ConfigError, Method, config_names, load_config
from tsgd_ray.config.schema import PACK
from tsgd_ray.methods import method_config


@pytest.mark.parametrize("name", config_names())
def test_random_real_never_packs_and_packed_real_is_a_baseline_where_the_run_packs(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # never the checkout: its outputs/ are the user's
    cfg = load_config(name, [f"storage.output_root={tmp_path}"])
    random = method_config(cfg, Method.random_real)
    assert not random.distill.pack and random.distill.iterations == 0 and random.distill.init.value == "real"
    packed = method_config(cfg, Method.packed_real)
    assert packed.distill.pack and packed.distill.iterations == 0
    # packed_real draws PACK x IPC of the same seeded candidates, random_real's IPC first among them
    assert layout.init_per_class(packed) == PACK * layout.init_per_class(random)
    assert layout.of(packed).stats == layout.of(random).stats
    if cfg.distill.pack:
        assert {Method.random_real, Method.packed_real} <= set(cfg.evaluate.baselines)


def test_every_registered_method_has_a_description_and_distinct_settings():
    configs = [method_config(load_config("default"), m) for m in methods.registered() if methods.get(m).distils]
    assert len({layout.keys(c)["distill"] for c in configs}) == len(configs)  # no two methods share a set
    assert all(methods.get(m).description for m in methods.registered())


def test_init_draws_rekey_init_and_what_follows_and_pair_the_baselines():
    """evaluate.draws: every distilling method once per draw, `full` once; a draw names its init
    folder (draw 0 keeps the keys a run without draws has), never the teacher or the statistics;
    random_real's draw d starts where packed_real's draw d does, so its clips are among those."""
    one = load_config("default", ["evaluate.baselines=[random_real,packed_real,full]"])
    cfg = load_config("default", ["evaluate.baselines=[random_real,packed_real,full]", "evaluate.draws=3"])
    arms = methods.arms(cfg)
    assert arms.count((Method.full, 0)) == 1 and len(arms) == 3 * 3 + 1
    for method in (Method.tsgd, Method.random_real, Method.packed_real):
        configs = [method_config(cfg, method, d) for d in range(3)]
        assert layout.of(configs[0], method).evaluate == layout.of(method_config(one, method), method).evaluate
        assert len({layout.keys(c)["distill"] for c in configs}) == 3
        assert len({layout.of(c).teacher for c in configs}) == len({layout.of(c).stats for c in configs}) == 1
        assert [layout.init_name(c).endswith(f"-draw{d}") for d, c in enumerate(configs)] == [False, True, True]
    for d in range(3):
        random, packed = method_config(cfg, Method.random_real, d), method_config(cfg, Method.packed_real, d)
        start = layout.init_offset(random)
        assert start == layout.init_offset(packed) == d * PACK * cfg.distill.ipc
        assert start + layout.init_per_class(random) <= start + layout.init_per_class(packed)
    assert (
        layout.of(method_config(cfg, Method.full, 2), Method.full).evaluate
        == layout.of(method_config(one, Method.full), Method.full).evaluate
    )  # `full` does not depend on the draw


def test_draws_beyond_the_kept_candidates_are_refused_naming_the_limit():
    with pytest.raises(ConfigError, match=r"evaluate.draws: .* draws end at 1 \(distill.draw \+ evaluate.draws <= 2\)"):
        load_config("default", ["distill.ipc=5", "distill.pack=true", "evaluate.draws=3"])
    load_config("default", ["distill.ipc=5", "distill.pack=true", "evaluate.draws=2"])


def test_a_layout_names_each_folder_from_keys_hashed_once_and_needs_a_method_for_evaluate(tmp_path):
    cfg = load_config("default", [f"storage.output_root={tmp_path}"])
    where = layout.of(cfg, Method.tsgd)
    keys = layout.keys(cfg, Method.tsgd)
    assert where.teacher == f"{tmp_path}/teacher/{keys['teacher']}" and where.teacher_file.endswith("/teacher.pt")
    assert where.init == f"{tmp_path}/stats/{keys['stats']}/init/{layout.init_name(cfg)}"
    assert where.synthetic == f"{tmp_path}/distill/{keys['distill']}/synthetic"
    assert where.seed(3) == f"{tmp_path}/evaluate/{keys['evaluate']}/seed-00003.json"
    assert keys["evaluate"].endswith("-tsgd") and layout.of(cfg).distill == where.distill
    # a method that does not distil hangs its students off the teacher: recovery settings do not re-key it
    edited = load_config("default", [f"storage.output_root={tmp_path}", "distill.iterations=7"])
    assert layout.keys(edited, Method.full)["evaluate"] == layout.keys(cfg, Method.full)["evaluate"]
    assert layout.keys(edited, Method.tsgd)["evaluate"] != keys["evaluate"]
    with pytest.raises(ValueError, match="without a method"):
        _ = layout.of(cfg).results
