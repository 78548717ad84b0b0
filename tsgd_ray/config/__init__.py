"""The configuration: the schema (`schema`: one dataclass per stage, each key's meaning as field
metadata), loading (`load`) and the generated reference (`reference`)."""

from tsgd_ray.config.load import (
    config_hash,
    config_names,
    load_config,
    resolve_config_path,
    shipped_configs,
    to_dict,
    to_yaml,
)
from tsgd_ray.config.schema import *  # noqa: F403 - the enums, the sections and ConfigError
from tsgd_ray.config.schema import MAX_IPC, PACK, ConfigError, fields_meta, keys_where, validate
