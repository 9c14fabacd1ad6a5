"""config.json: what it claims about the weights' dtype, and the fix after a cast.

transformers reads ``torch_dtype`` (every version) or ``dtype`` (>= 4.56, which prefers
it), at the top level and in sub-configs (``text_config``, ``vision_config``...). Other
libraries keep a config.json of their own beside weights (diffusers' ``_class_name``
configs, sentence-transformers' ``1_Pooling/config.json``): they get no dtype key they
did not have, since their loaders do not read one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastcast._core import ModelFolderError

CONFIG_NAME = "config.json"
DTYPE_KEYS = ("torch_dtype", "dtype")


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict; ModelFolderError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        data = TOO_DEEP
    if data is TOO_DEEP or nesting(data) > MAX_NESTING:
        raise ModelFolderError(
            f"{path}: nested more than {MAX_NESTING} levels deep; not a model config"
        )
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: not a JSON object")
    return data


#: Deeper than any real config (transformers' nest a few levels); what is deeper would
#: make every recursive walk of it (ours, transformers') fail.
MAX_NESTING = 64
#: What a config too deep for Python's JSON parser reads as.
TOO_DEEP = object()


def nesting(value: object) -> int:
    """How deep lists and dicts nest in ``value`` (a scalar is 0), walked without
    recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def is_transformers_config(config: dict[str, Any]) -> bool:
    """A transformers model config (``model_type`` or ``architectures``), whose loader
    reads ``torch_dtype``; diffusers' configs have ``_class_name`` instead."""
    return "model_type" in config or "architectures" in config


def is_sub_config(key: str, value: dict[str, Any]) -> bool:
    """Nested configs (text_config, vision_config, encoder...) carry their own dtype;
    quantization settings and the like do not."""
    return key != "quantization_config" and (
        key.endswith("_config") or key in ("encoder", "decoder") or "model_type" in value
    )


def config_dtypes(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every dtype claim in a config, by dotted key (``text_config.torch_dtype``)."""
    found: dict[str, str] = {}
    for key, value in config.items():
        if key in DTYPE_KEYS and isinstance(value, str):
            found[prefix + key] = value
        elif isinstance(value, dict) and is_sub_config(key, value):
            found.update(config_dtypes(value, f"{prefix}{key}."))
    return found


def retype_config(config: dict[str, Any], torch_name: str, top: bool = True) -> dict[str, Any]:
    """``config`` with its dtype claims set to ``torch_name``; key order kept.

    Both keys, wherever a config names its dtype: transformers >= 4.56 writes and
    prefers ``dtype``, while older readers (vLLM releases, sglang, unsloth) read only
    ``torch_dtype``, and a config with one of them right and the other stale (or
    missing) is read differently by each. So a transformers config gets both at its
    top, and every sub-config (``text_config``...) that names either gets both.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in DTYPE_KEYS and (value is None or isinstance(value, str)):
            out[key] = torch_name
            for other in DTYPE_KEYS:  # its twin right beside it
                if other not in config:
                    out[other] = torch_name
        elif isinstance(value, dict) and is_sub_config(key, value):
            out[key] = retype_config(value, torch_name, top=False)
        else:
            out[key] = value
    if top and is_transformers_config(config):
        for key in DTYPE_KEYS:
            out.setdefault(key, torch_name)
    return out


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without ``quantization_config``, at the top or in a sub-config: a
    dequantized model is a plain one, and loaders would treat it as quantized."""
    return {
        key: without_quantization(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key != "quantization_config"
    }


def to_json(config: dict[str, Any]) -> str:
    """config.json as transformers writes it: 2-space indent, key order kept."""
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
