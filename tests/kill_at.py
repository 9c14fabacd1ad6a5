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
    writing    while the executor runs, as soon as a shard is being written (a
               partial file exists in the staging folder)

``journaled:N@INT`` and ``writing@INT`` send SIGINT (Ctrl-C) instead: the process goes
on to handle it, and this script exits with fastcast's exit code. Watching from a
thread of the process itself, rather than from the test, keeps the signal in time on
a busy machine.

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
from pathlib import Path
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


#: Set once a watched point was reached and its signal sent.
reached = threading.Event()


def watch(journal: Path, until: Callable[[Path], bool], sig: signal.Signals) -> None:
    """Send ``sig`` to this process once ``until(journal)`` holds."""
    while not until(journal):
        time.sleep(0.0005)
    reached.set()
    if sig == signal.SIGKILL:
        die()
    # CLOCK_MONOTONIC is system-wide: the test can time the stop from here.
    print(f"kill_at: sent {sig.name} at {time.monotonic()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


def journaled(n: int) -> Callable[[Path], bool]:
    def holds(journal: Path) -> bool:
        try:
            return journal.read_bytes().count(b"\n") >= n
        except FileNotFoundError:
            return False

    return holds


def writing(journal: Path) -> bool:
    return any(journal.parent.rglob("*.fastcast-partial"))


def install(point: str) -> None:
    point, _, how = point.partition("@")
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
    elif kind in ("journaled", "writing"):
        from fastcast import _core

        sig = signal.SIGINT if how == "INT" else signal.SIGKILL
        if sig == signal.SIGINT:
            # As in a terminal: a process started in the background of a
            # non-interactive shell (as CI scripts start things) inherits SIGINT
            # ignored, and Python then never raises KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        until = journaled(int(arg)) if kind == "journaled" else writing
        real_execute = _core.execute_plan

        def watched(*a: Any, **kw: Any) -> Any:
            args = (Path(kw["journal"]), until, sig)
            threading.Thread(target=watch, args=args, daemon=True).start()
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
    if reached.is_set():  # a signal fastcast handles (Ctrl-C): its own exit code
        return code
    print(f"kill_at: {point} was never reached (exit {code})", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
