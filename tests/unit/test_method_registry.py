"""The methods registry keeps the baselines honest in every shipped config: random_real is real
clips as drawn (never packed, never edited), and where the run packs, packed_real (packing alone)
is a baseline beside it."""

from __future__ import annotations

import pytest

from tsgd_ray import layout, methods
from tsgd_ray.config import Method, config_names, load_config
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
    assert layout.stats_dir(packed) == layout.stats_dir(random)
    if cfg.distill.pack:
        assert {Method.random_real, Method.packed_real} <= set(cfg.evaluate.baselines)


def test_every_registered_method_has_a_description_and_distinct_settings():
    configs = [method_config(load_config("default"), m) for m in methods.registered() if methods.get(m).distils]
    assert len({layout.distill_key(c) for c in configs}) == len(configs)  # no two methods share a set
    assert all(methods.get(m).description for m in methods.registered())
