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

    cleanup:N  while the staging folder is removed after a commit (an rmtree of a
               folder named ``.fastcast-staging...``): just before its Nth removal
               of a file or folder; ``cleanup:NAME``: right after it removed the
               file named NAME (``run.json``), whatever order the folder lists

Points where the process is not killed but something happens to it (this script then
exits with fastcast's exit code):
    hold-mkdir:FILE    right after the first folder is created, wait until FILE
               exists (announced on stderr with ``kill_at: holding``): another run
               can be started in the window between creating and locking
    hold-execute:FILE  just before the executor runs, wait until FILE exists
               (announced as above): the run holds its output meanwhile
    truncate:PATH  while the executor runs, as soon as a shard is being written,
               truncate the input PATH to half its size (another program did it)
    enospc:NAME  every write to a file named NAME fails with ENOSPC, as a full disk
               makes ``write(2)`` fail: with no file name in the error

``journaled:N@INT`` and ``writing@INT`` send SIGINT (Ctrl-C) instead: the process goes
on to handle it, and this script exits with fastcast's exit code. Watching from a
thread of the process itself, rather than from the test, keeps the signal in time on
a busy machine.

The process exits by SIGKILL at the point; if the point is never reached the
command runs to completion and this script exits 3, so a test can tell.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


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


def hold(release: Path) -> None:
    """Announce the hold on stderr, then wait until ``release`` exists."""
    reached.set()
    print("kill_at: holding", file=sys.stderr, flush=True)
    while not release.exists():
        time.sleep(0.005)


def truncate_when(path: Path, journal: Path) -> None:
    """Once a shard is being written, truncate ``path`` to half its size."""
    while not writing(journal):
        time.sleep(0.0005)
    os.truncate(path, path.stat().st_size // 2)
    reached.set()


class FullDisk(io.TextIOBase):
    """A file whose every write fails as on a full disk (the OS names no file)."""

    def __init__(self, inner: IO[Any]) -> None:
        self.inner = inner

    def write(self, data: Any) -> int:
        reached.set()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines: Any) -> None:
        self.write("")

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def close(self) -> None:
        self.inner.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def install(point: str) -> None:
    point, _, how = point.partition("@")
    kind, _, arg = point.partition(":")
    if kind == "cleanup":
        nth = nth_call(int(arg)) if arg.isdigit() else lambda: False
        real_rmtree = shutil.rmtree
        real_unlink, real_rmdir = os.unlink, os.rmdir

        def counted(real: Callable[..., Any]) -> Callable[..., Any]:
            def remove(path: Any, *a: Any, **kw: Any) -> Any:
                if nth():
                    die()
                done = real(path, *a, **kw)
                if Path(os.fsdecode(path)).name == arg:
                    die()
                return done

            return remove

        def rmtree(path: Any, *a: Any, **kw: Any) -> Any:
            if not Path(path).name.startswith(".fastcast-staging"):
                return real_rmtree(path, *a, **kw)
            os.unlink, os.rmdir = counted(real_unlink), counted(real_rmdir)  # type: ignore[assignment]
            try:
                return real_rmtree(path, *a, **kw)
            finally:
                os.unlink, os.rmdir = real_unlink, real_rmdir  # type: ignore[assignment]

        shutil.rmtree = rmtree  # type: ignore[assignment]
        return
    if kind == "hold-mkdir":
        real_mkdir = os.mkdir
        first = nth_call(1)

        def mkdir(*a: Any, **kw: Any) -> None:
            real_mkdir(*a, **kw)
            if first():
                hold(Path(arg))

        os.mkdir = mkdir  # type: ignore[assignment]
        return
    if kind == "hold-execute":
        from fastcast import _core

        real_run = _core.execute_plan

        def held(*a: Any, **kw: Any) -> Any:
            hold(Path(arg))
            return real_run(*a, **kw)

        _core.execute_plan = held  # type: ignore[assignment]
        return
    if kind == "truncate":
        from fastcast import _core

        real_exec = _core.execute_plan

        def truncating(*a: Any, **kw: Any) -> Any:
            args = (Path(arg), Path(kw["journal"]))
            threading.Thread(target=truncate_when, args=args, daemon=True).start()
            return real_exec(*a, **kw)

        _core.execute_plan = truncating  # type: ignore[assignment]
        return
    if kind == "enospc":
        real_open = builtins.open

        def full_open(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            f = real_open(file, mode, *a, **kw)
            writes = any(c in mode for c in "wax+")
            if writes and isinstance(file, (str, os.PathLike)) and Path(file).name == arg:
                return FullDisk(f)
            return f

        builtins.open = io.open = full_open  # type: ignore[assignment]
        return
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
