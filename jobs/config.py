"""One configuration system for every job: a module's `default_conf` (nested dicts and frozen
dataclasses), deep-merged with the caller's overrides, every key checked.

    pixloc localize ... --conf router.max_cells=3 shard.localize.min_inlier_ratio=0.3 method=sparse
    merge_conf(default_conf, {"router": {"max_cells": 3}})

Values on the command line are YAML (`--conf levels=[1,2] quick=true`); a dotted key reaches into
nested dicts and dataclasses. Explicit flags (`--workers 2`) are overrides too; `--conf` comes last.
"""
from __future__ import annotations

import yaml

from pixloc_core.conf import merge_conf

__all__ = ["merge_conf", "parse_overrides"]


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
