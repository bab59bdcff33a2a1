"""One configuration system for every job: a module's `default_conf` (nested dicts and frozen
dataclasses), deep-merged with the caller's overrides, every key checked.

    pixloc localize ... --conf router.max_cells=3 shard.localize.min_inlier_ratio=0.3 method=sparse
    merge_conf(default_conf, {"router": {"max_cells": 3}})

Values on the command line are YAML (`--conf levels=[1,2] quick=true`); a dotted key reaches into
nested dicts and dataclasses. Explicit flags (`--workers 2`) are overrides too; `--conf` comes last.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml


def parse_overrides(items: list[str]) -> dict:
    """["a.b=1", "c=[1, 2]"] -> {"a": {"b": 1}, "c": [1, 2]}."""
    overrides: dict = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"--conf {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = overrides
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"--conf {item!r}: {parent} is given a value and sub-keys")
        node[leaf] = yaml.safe_load(value)
    return overrides


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
