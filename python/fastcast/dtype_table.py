"""The core's dtype table, as Python lookups: sizes, castability, torch names.

One place for what every module asks about a dtype, built once from
``_core.dtypes()`` (the Rust enum is the source of truth).
"""

from __future__ import annotations

from fastcast import _core

_DTYPES = {d["name"]: d for d in _core.dtypes()}
_BY_TORCH_NAME = {d["torch_name"]: d["name"] for d in _core.dtypes()}

#: Short name of each target dtype, for folder names and messages (``model-bf16``).
SHORT_NAMES = {
    "BF16": "bf16",
    "F16": "fp16",
    "F32": "fp32",
    "F64": "fp64",
    "F8_E4M3": "fp8_e4m3",
    "F8_E5M2": "fp8_e5m2",
}


def element_size(dtype: str) -> int:
    """Bytes per element (1 for the sub-byte formats, which align to bytes)."""
    return max(1, int(_DTYPES[dtype]["bits"]) // 8)


def is_castable(dtype: str) -> bool:
    """True for the float dtypes fastcast converts between."""
    return bool(_DTYPES[dtype]["castable"])


def torch_name(dtype: str) -> str:
    """``"BF16"`` -> ``"bfloat16"``: torch's name, and config.json's."""
    return str(_DTYPES[dtype]["torch_name"])


def from_torch_name(name: str) -> str | None:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``"BF16"``; None if unknown."""
    return _BY_TORCH_NAME.get(name.removeprefix("torch."))
