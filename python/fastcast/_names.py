"""How fastcast writes names in paths and messages: one rule each, used everywhere."""

from __future__ import annotations

from collections.abc import Sequence


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder``, relative to the model (``''`` is the model itself)."""
    return f"{folder}/{name}" if folder else name


def listing(names: Sequence[str], shown: int, *, more: str = " and") -> str:
    """``a, b, c and 2 more``: the first ``shown`` names, then how many were left out.
    ``more`` is what comes before the count (``", and"`` in a list of long items)."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f"{more} {rest} more" if rest > 0 else "")
