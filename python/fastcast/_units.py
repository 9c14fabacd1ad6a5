"""Byte sizes as people write them: parsing ``5GB``/``2GiB`` and printing sizes."""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
#: The largest size taken (an exabyte): every size becomes a 64-bit count in the core.
MAX_SIZE = 10**18


def parse_size(size: int | str, what: str = "size") -> int:
    """Bytes in ``size``, read as transformers/huggingface_hub read ``max_shard_size``.

    KB/MB/GB/TB are powers of 10 (``"5GB"`` is 5,000,000,000); KiB/MiB/GiB/TiB are
    powers of 2; a plain integer is bytes. ``what`` names the size in errors
    (``shard size``).

    >>> parse_size("5GB"), parse_size("2GiB"), parse_size(1024), parse_size("1.5MB")
    (5000000000, 2147483648, 1024, 1500000)
    """
    if isinstance(size, bool):
        raise ValueError(f"{what}: not a size: {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"{what} must be positive, not {size}")
        return checked_size(size, size, what)
    match = _SIZE.match(str(size))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{what}: not a size: {size!r} (examples: 5GB, 500MB, 2GiB, 1000000; "
            "KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2)"
        )
    value = int(Decimal(match.group(1)) * _UNITS[unit])  # exact: no float to overflow
    if value <= 0:
        raise ValueError(f"{what} must be positive, not {size!r}")
    return checked_size(value, size, what)


def checked_size(value: int, given: int | str, what: str) -> int:
    """``value``, or a ValueError when it is past ``MAX_SIZE``."""
    if value > MAX_SIZE:
        raise ValueError(f"{what} {given!r} is too large (at most 1000PB, {MAX_SIZE} bytes)")
    return value


def format_bytes(n: float) -> str:
    """A byte count for people, in powers of 10 like disk vendors and the Hub.

    >>> format_bytes(15_012_345_678), format_bytes(512), format_bytes(2_500_000)
    ('15.0 GB', '512 B', '2.5 MB')
    """
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
