"""numpy arrays in, numpy arrays out: the cast kernels for users and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from fastcast import _core

if TYPE_CHECKING:
    import numpy as np

#: numpy storage for each castable dtype's bits. bf16 and fp8 have no numpy
#: dtype of their own, so their results are raw bits in unsigned integers
#: (view them with ``ml_dtypes`` or ``torch.from_numpy(a).view(torch.bfloat16)``).
#: By name, so that importing fastcast (and running the CLI) does not import numpy.
STORAGE: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "uint16",
    "F8_E4M3": "uint8",
    "F8_E5M2": "uint8",
}


def source_dtype(array: np.ndarray, source: str | None) -> str:
    """The safetensors dtype of ``array``'s elements.

    numpy's float16/32/64 and ml_dtypes' bfloat16/float8_e4m3fn/float8_e5m2
    are recognised by name; raw bits in uint16/uint8 need ``source``.
    """
    import numpy as np

    if source is not None:
        name = _core.parse_dtype(source)
        if name not in STORAGE or np.dtype(STORAGE[name]).itemsize != array.dtype.itemsize:
            raise _core.DtypeError(
                f"source={source!r} does not match a {array.dtype} array "
                f"({array.dtype.itemsize}-byte elements)"
            )
        return name
    try:
        name = _core.parse_dtype(array.dtype.name)
    except _core.DtypeError:
        name = ""
    if name not in STORAGE:
        raise _core.DtypeError(
            f"cannot tell what a {array.dtype} array holds; pass source= (e.g. source='bf16' "
            "for bfloat16 bits in uint16) or use a float16/float32/float64 array"
        )
    return name


def cast_array(
    array: np.ndarray,
    dtype: str,
    *,
    source: str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    kernel: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Cast ``array`` to ``dtype`` bit-for-bit as ``torch.Tensor.to(dtype)`` does.

    ``dtype`` takes any name fastcast accepts (``"bf16"``, ``"torch.float16"``,
    ``"F8_E4M3"``...). bf16 results come back as uint16 bits, fp8 as uint8.
    ``fp8_overflow`` picks what e4m3fn does past ±448: ``"saturate"`` (torch
    >= 2.14) or ``"nan"`` (older torch, ml_dtypes). ``kernel`` forces a path
    (``"scalar"``, ``"avx2"``, ``"avx512"``; default: ``$FASTCAST_KERNEL`` or the
    fastest). Runs in parallel with the GIL released.

    >>> import numpy as np, fastcast
    >>> fastcast.cast_array(np.array([1.0, 65536.0], np.float32), "bf16")
    array([16256, 18304], dtype=uint16)
    """
    import numpy as np

    src_name = source_dtype(array, source)
    dst_name = _core.parse_dtype(dtype)
    if dst_name not in STORAGE:
        raise _core.DtypeError(
            f"cannot cast to {dtype!r}: not a floating-point dtype fastcast casts"
        )
    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    out = np.empty(array.shape, dtype=STORAGE[dst_name])
    _core.cast_into(
        flat.view(np.uint8),
        src_name,
        out.reshape(-1).view(np.uint8),
        dst_name,
        fp8_overflow=fp8_overflow,
        kernel=kernel,
        threads=threads,
    )
    return out
