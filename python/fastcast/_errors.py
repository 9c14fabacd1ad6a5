"""How a failure is told: one line naming the file and the problem, and what a run
that failed kept for later. A leaf: every layer that reports an error uses it."""

from __future__ import annotations

from pathlib import Path

#: The note a failed run adds to its error when its finished shards are kept.
RESUMABLE = "the finished shards are kept in {}: run the same command with --resume"


def one_line(e: BaseException) -> str:
    """One line naming the file and the problem: ``out/x: No space left on device``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror}"
    return str(e)


def mark_resumable(error: BaseException, out: Path) -> None:
    """Note on ``error`` that the run's finished shards are kept in ``out``: the CLI adds
    it to its one line, and a traceback shows it."""
    error.add_note(RESUMABLE.format(out))


def resume_hint(error: BaseException) -> str:
    """``; <the note>`` when ``error`` says a run kept its finished shards, else ''."""
    prefix = RESUMABLE.split("{}", 1)[0]
    for note in getattr(error, "__notes__", ()):
        if isinstance(note, str) and note.startswith(prefix):
            return f"; {note}"
    return ""
