"""Run the fastcast command and SIGKILL it at a point a test names.

A real process, killed for real (no handler runs, nothing is cleaned up), but at a
place chosen by the test rather than by a timer, so that what a kill leaves behind
at each step of a conversion is exercised every time:

    python tests/kill_at.py copy:2 -- convert model/ -o out --dtype bf16

Points:
    copy:N     halfway through the Nth file copy (``shutil.copyfile``): the
               destination holds half the bytes when the process dies
    replace:N  just before the Nth ``os.replace`` (renames into place)
    executed   right after the Rust executor returns (every shard written, nothing
               after it done)
    journaled:N  while the executor runs, as soon as its journal holds N finished
               shards (a thread polls it; the next shards are being written)

The process exits by SIGKILL at the point; if the point is never reached the
command runs to completion and this script exits 3, so a test can tell.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def nth_call(n: int) -> Callable[[], bool]:
    """A counter that answers True on its nth call only."""
    calls = [0]

    def counted() -> bool:
        calls[0] += 1
        return calls[0] == n

    return counted


def watch(journal: Any, n: int) -> None:
    """Die once ``journal`` has ``n`` lines (finished shards)."""
    while True:
        try:
            with open(journal, "rb") as f:
                if f.read().count(b"\n") >= n:
                    die()
        except FileNotFoundError:
            pass
        time.sleep(0.0005)


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "copy":
        nth = nth_call(int(arg))
        real_copyfile = shutil.copyfile

        def copyfile(src: Any, dst: Any, *a: Any, **kw: Any) -> Any:
            if nth():
                with open(src, "rb") as f:
                    data = f.read()
                with open(dst, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            return real_copyfile(src, dst, *a, **kw)

        shutil.copyfile = copyfile  # type: ignore[assignment]
    elif kind == "replace":
        nth = nth_call(int(arg))
        real_replace = os.replace

        def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            if nth():
                die()
            real_replace(src, dst, *a, **kw)

        os.replace = replace  # type: ignore[assignment]
    elif kind == "executed":
        from fastcast import _core

        real_execute = _core.execute_plan

        def execute_plan(*a: Any, **kw: Any) -> Any:
            real_execute(*a, **kw)
            die()

        _core.execute_plan = execute_plan  # type: ignore[assignment]
    elif kind == "journaled":
        from fastcast import _core

        real_execute = _core.execute_plan

        def watched(*a: Any, **kw: Any) -> Any:
            journal = kw["journal"]
            threading.Thread(target=watch, args=(journal, int(arg)), daemon=True).start()
            return real_execute(*a, **kw)

        _core.execute_plan = watched  # type: ignore[assignment]
    else:
        raise SystemExit(f"kill_at: unknown point {point!r}")


def main() -> int:
    point, sep, *argv = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: kill_at.py POINT -- fastcast arguments...")
    install(point)
    from fastcast.cli import main as fastcast_main

    code = fastcast_main(argv)
    print(f"kill_at: {point} was never reached (exit {code})", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
