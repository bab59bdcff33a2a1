"""The one configuration system of the project: a step's `default_conf` (nested dicts and frozen
dataclasses), deep-merged with the caller's overrides, every key checked. The jobs (jobs/config.py)
add the command line's `--conf KEY=VALUE` on top.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def merge_conf(defaults: dict, *overrides: dict | None) -> dict:
    """`defaults` with each override applied in turn, deeply; an unknown key is an error naming it."""
    conf = dict(defaults)
    for override in overrides:
        conf = _merge(conf, override or {}, "")
    return conf


def _merge(default: Any, override: Any, where: str) -> Any:
    if isinstance(override, dict) and isinstance(default, dict) and default:
        merged = dict(default)
        for key, value in override.items():
            if key not in default:
                raise ValueError(f"unknown conf key {where}{key}, expected one of {sorted(default)}")
            merged[key] = _merge(default[key], value, f"{where}{key}.")
        return merged
    if isinstance(override, dict) and dataclasses.is_dataclass(default) and not isinstance(default, type):
        names = [field.name for field in dataclasses.fields(default)]
        unknown = sorted(set(override) - set(names))
        if unknown:
            raise ValueError(f"unknown conf key {where}{unknown[0]}, expected one of {names}")
        return dataclasses.replace(default, **{key: _merge(getattr(default, key), value, f"{where}{key}.")
                                               for key, value in override.items()})
    if isinstance(default, tuple) and isinstance(override, list):
        return tuple(override)
    return override
