"""Each config.json of an output: its dtype claims set to the target (both keys,
nested configs too), its quantization removed or added, and which dtypes the weights
beside it are written in."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastcast._dtypes import torch_name, uncastable_notes
from fastcast._plan.shards import ConversionPlan
from fastcast._source.config import (
    config_dtypes,
    read_config,
    retype_config,
    to_json,
    without_quantization,
)
from fastcast._source.folder import ModelFolder
from fastcast._source.quantization import scheme_of


@dataclass(frozen=True)
class ConfigFix:
    """One config.json of the output: its new text, or None to copy it unchanged."""

    rel: str
    text: str | None
    changes: dict[str, tuple[str, str]]


def fix_configs(
    folder: ModelFolder,
    target: str | None,
    drop_quantization: bool = False,
    add_quantization: dict[str, dict[str, Any]] | None = None,
    claims: dict[str, Counter[str]] | None = None,
    set_keys: dict[str, dict[str, Any]] | None = None,
) -> list[ConfigFix]:
    """Every config.json beside the weights, with its dtype claims set to the target
    (and, for a dequantized model, without quantization_config; for a quantized one,
    with the ``quantization_config`` that ``add_quantization`` gives for its path).
    ``claims``: the dtypes written in each folder; a config beside none written in the
    target keeps its claims (it would name a dtype no weight of it has). ``set_keys``:
    per config, keys set to new values where the config has them (at the top, else in
    ``text_config``), or at the top (``--merge-lora``: ``vocab_size``...)."""
    if target is None and not add_quantization and not set_keys:  # every tensor keeps
        return [ConfigFix(rel, None, {}) for rel in folder.configs]  # its dtype: so do configs
    fixes = []
    for rel in folder.configs:
        config = read_config(folder.root / rel)
        where = rel.rpartition("/")[0]
        held = claims.get(where) if claims is not None else None
        keys = (set_keys or {}).get(rel, {})
        if target is not None and held is not None and not held[target] and not keys:
            fixes.append(ConfigFix(rel, None, {}))  # no weight beside it is in the target
            continue
        retyped = retype_config(config, torch_name(target)) if target else dict(config)
        changes = set_config_keys(retyped, keys)
        if drop_quantization:
            retyped = without_quantization(retyped)
        added = (add_quantization or {}).get(rel)
        if added is not None:
            retyped["quantization_config"] = added
        if retyped == config:
            fixes.append(ConfigFix(rel, None, {}))
            continue
        before, after = config_dtypes(config), config_dtypes(retyped)
        changes |= {k: (before.get(k, "(none)"), v) for k, v in after.items() if before.get(k) != v}
        if drop_quantization and without_quantization(config) != config:
            changes["quantization_config"] = ("present", "removed")
        if added is not None:
            method = str(added["quant_method"])
            had = changes.get("quantization_config", ("(none)", ""))[0]  # dequantized first
            changes["quantization_config"] = (had, f"{method} ({scheme_of(method, added)})")
        fixes.append(ConfigFix(rel, to_json(retyped), changes))
    return fixes


def set_config_keys(config: dict[str, Any], keys: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Set ``keys`` in ``config`` where it has them (the top, else ``text_config``),
    else at the top; the changes, as (before, after) text."""
    changes = {}
    for key, value in keys.items():
        text = config.get("text_config")
        where = config
        if key not in config and isinstance(text, dict) and key in text:
            where = config["text_config"] = dict(text)  # a copy: the source's stays as read
        before = where.get(key, "(none)")
        if before != value:
            where[key] = value
            changes[key] = (json.dumps(before) if before != "(none)" else before, json.dumps(value))
    return changes


def written_dtypes(plan: ConversionPlan) -> dict[str, Counter[str]]:
    """How many tensors each folder's weights write in each dtype (``unet`` ->
    {``BF16``: 190...})."""
    found: dict[str, Counter[str]] = {}
    for sp in plan.sets:
        where = sp.key.rpartition("/")[0]
        for shard in sp.shards:
            found.setdefault(where, Counter()).update(shard.dtypes())
    return found


def uncastable(written: dict[str, Counter[str]], target: str | None) -> list[str]:
    """What a user should know of float tensors no cast reaches (``uncastable_notes``)."""
    if target is None:
        return []
    return uncastable_notes(sum(written.values(), Counter()))
