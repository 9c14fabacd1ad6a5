"""The core's dtype table, as Python lookups: sizes, castability, short and torch names.

Built once from ``_core.dtypes()``: the Rust enum is the one source of truth, so
nothing here re-types a size, a name or a range.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fastcast import _core

_DTYPES = {d["name"]: d for d in _core.dtypes()}
_BY_TORCH_NAME = {d["torch_name"]: d["name"] for d in _core.dtypes()}

#: Short name of each castable dtype, for folder names and messages (``model-bf16``).
SHORT_NAMES: dict[str, str] = {
    d["name"]: d["short_name"] for d in _core.dtypes() if d["short_name"] is not None
}


#: The dtypes a model's computing weights are written in when fastcast builds them:
#: a --dequantize result, and the unquantized tensors (and ``torch_dtype``) beside a
#: --quantize result.
COMPUTE_DTYPES = ("BF16", "F16", "F32")
#: Bytes per element (1 for the sub-byte formats, which align to bytes).
_SIZES = {name: max(1, int(d["bits"]) // 8) for name, d in _DTYPES.items()}


def bits(dtype: str) -> int:
    """Bits per element (4 for fp4, 6 for fp6)."""
    return int(_DTYPES[dtype]["bits"])


def element_size(dtype: str) -> int:
    """Bytes per element (1 for the sub-byte formats, which align to bytes)."""
    return _SIZES[dtype]


def is_castable(dtype: str) -> bool:
    """True for the float dtypes fastcast converts between."""
    return bool(_DTYPES[dtype]["castable"])


def is_float(dtype: str) -> bool:
    """True for every float dtype, castable or not (fp8 fnuz, fp6, fp4, e8m0...)."""
    return bool(_DTYPES[dtype]["is_float"])


def torch_name(dtype: str) -> str:
    """``"BF16"`` -> ``"bfloat16"``: torch's name, and config.json's."""
    return str(_DTYPES[dtype]["torch_name"])


def from_torch_name(name: str) -> str | None:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``"BF16"``; None if unknown."""
    return _BY_TORCH_NAME.get(name.removeprefix("torch."))


def dominant_float(sizes: Iterable[tuple[str, int]]) -> str | None:
    """Of (dtype, bytes) pairs, the float dtype holding the most bytes, if any: what a
    model is "in" (its config's dtype, fastcast's default for a tensor it adds)."""
    totals: dict[str, int] = {}
    for dtype, nbytes in sizes:
        if is_castable(dtype):
            totals[dtype] = totals.get(dtype, 0) + nbytes
    return max(totals, key=totals.__getitem__) if totals else None


def short_name(dtype: str) -> str:
    """``"BF16"`` -> ``"bf16"``; the safetensors name in lower case if it has none."""
    return SHORT_NAMES.get(dtype, dtype.lower())


def max_finite(dtype: str) -> float | None:
    """The largest finite value of a castable dtype (448 for fp8 e4m3fn)."""
    value = _DTYPES[dtype]["max"]
    return None if value is None else float(value)


def uncastable_notes(counts: Mapping[str, int]) -> list[str]:
    """A line per float dtype no cast reaches (fp8 fnuz, fp6, fp4...) in ``counts``
    (dtype -> tensors): a conversion copies them as they are, whatever its target.

    >>> uncastable_notes({"F8_E4M3FNUZ": 2, "F32": 5})
    ['2 tensor(s) in F8_E4M3FNUZ, a float format fastcast cannot cast: copied as they are']
    """
    return [
        f"{n} tensor(s) in {dtype}, a float format fastcast cannot cast: copied as they are"
        for dtype, n in sorted(counts.items())
        if n and is_float(dtype) and not is_castable(dtype)
    ]
