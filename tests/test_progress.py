"""Progress as a user sees it: a byte bar on a terminal (convert, --verify, inspect
--dtype, a batch), nothing in a pipe, with --quiet or with ``progress=False``."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import fastcast
from commands import cli, ok
from conftest import require
from folders import save_folder, tensors


def small_model(path: Path) -> Path:
    """The tests' small folder (``folders.save_folder``): enough for every command to
    show its bar."""
    st, torch = require("safetensors.torch"), require("torch")
    return save_folder(st, path, tensors(torch))


def on_a_terminal(*args: object) -> tuple[int, str]:
    """``fastcast ARGS...`` with stderr on a pseudo-terminal, as from a shell: its exit
    code and everything the terminal was sent."""
    leader, follower = pty.openpty()
    # 24 rows of 100 columns: a fresh pty is 0 columns wide, and tqdm draws its bar to
    # the width it reads (dynamic_ncols), so it would draw nothing.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastcast.cli", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    shown = []
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # EIO: the command has closed its end
            break
        if not data:
            break
        shown.append(data)
    os.close(leader)
    return proc.wait(), b"".join(shown).decode(errors="replace")


@pytest.mark.parametrize(
    ("command", "label"),
    [
        (["convert", "{model}", "-o", "{out}", "--dtype", "bf16"], "converting"),
        (["convert", "{model}", "-o", "{out}", "--dtype", "bf16", "--verify"], "verifying"),
        (["inspect", "{model}", "--dtype", "fp16"], "scanning"),
        (["convert", "{model}", "{other}", "-o", "{out}", "--dtype", "bf16"], "batch"),
    ],
)
def test_a_terminal_shows_a_bar_and_quiet_or_a_pipe_shows_none(tmp_path, command, label):
    model, other = small_model(tmp_path / "m"), small_model(tmp_path / "n")

    def args(out: str) -> list[str]:
        return [a.format(model=model, other=other, out=tmp_path / out) for a in command]

    code, shown = on_a_terminal(*args("shown"))
    assert code == 0, shown
    assert label in shown and "B/s" in shown, shown
    r = cli(*args("piped"))
    ok(r)
    assert label not in r.stderr, r.stderr
    if command[0] == "convert":
        code, shown = on_a_terminal(*args("quiet"), "--quiet")
        assert code == 0, shown
        assert label not in shown, shown


def test_the_api_shows_a_bar_only_when_asked(tmp_path, capsys):
    model = small_model(tmp_path / "m")
    fastcast.convert(model, "bf16", output=tmp_path / "shown", progress=True)
    assert "converting" in capsys.readouterr().err
    fastcast.convert(model, "bf16", output=tmp_path / "hidden", progress=False)
    assert capsys.readouterr().err == ""
    # In a test, stderr is no terminal: the default shows nothing either.
    fastcast.convert(model, "bf16", output=tmp_path / "default")
    assert "converting" not in capsys.readouterr().err
