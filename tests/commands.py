"""Running the ``fastcast`` command as a user does, for the tests: a subprocess, its
exit code, its one-line errors, and the same command SIGKILLed at a named point."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``fastcast ARGS...`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "fastcast.cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def killed(point: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``fastcast ARGS...`` SIGKILLed at ``point`` (see kill_at.py); fails the test if
    the point was never reached."""
    r = subprocess.run(
        [sys.executable, str(HERE / "kill_at.py"), point, "--", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == -signal.SIGKILL, f"not killed at {point}: {r.returncode} {r.stderr}"
    return r


def ok(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 0 without a traceback; returns stdout."""
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def refused(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1 with exactly one ``fastcast: error:`` line holding ``words`` (warnings
    aside) and no traceback; returns the line."""
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("fastcast: warning:")]
    assert len(errors) == 1 and errors[0].startswith("fastcast: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
