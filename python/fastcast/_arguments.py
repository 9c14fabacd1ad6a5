"""Arguments of the public API checked once, with the right types: a pattern list that
is not a string, a thread count that is sane.

A ``str`` where a sequence of patterns is expected is the classic Python trap: it is a
sequence, of one-character patterns, so ``keep="*norm*"`` would keep every tensor.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

from fastcast._loss import FastcastWarning

#: Worker threads past this many per core only cost memory and start-up time (each
#: thread has its chunk buffers): a thread count above it is lowered, with a warning.
THREADS_PER_CORE = 4


def as_patterns(value: Iterable[str] | None, name: str) -> list[str]:
    """``value`` as a list of glob patterns; TypeError for a string or for an item
    that is not one.

    >>> as_patterns(("*norm*",), "keep")
    ['*norm*']
    >>> as_patterns("*norm*", "keep")
    Traceback (most recent call last):
    TypeError: keep must be a list of patterns, not a string: keep=['*norm*']
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of patterns, not a string: {name}=[{str(value)!r}]")
    patterns = list(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a list of patterns (strings), not {p!r} in it")
    return patterns


def thread_count(threads: int | None, stacklevel: int = 3) -> int:
    """Worker threads for a run: ``threads``, or every core when None; a count above
    ``THREADS_PER_CORE`` per core is lowered to that, with a ``FastcastWarning``.

    >>> thread_count(1)
    1
    """
    cores = os.cpu_count() or 1
    if threads is None:
        return cores
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int, not {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    most = THREADS_PER_CORE * cores
    if threads > most:
        warnings.warn(
            f"--threads {threads}: using {most} ({THREADS_PER_CORE} per core of this "
            f"machine's {cores}); more only add memory and start-up time",
            FastcastWarning,
            stacklevel=stacklevel,
        )
        return most
    return threads
