"""Progress as a user sees it: a byte bar on a terminal (convert, --verify, inspect
--dtype, a batch), nothing in a pipe, with --quiet or with ``progress=False``."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import fastcast
from commands import cli, ok


def small_model(path: Path, seed: int = 0) -> Path:
    """Two fp32 tensors and a config: enough for every command to show its bar."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(32).astype(np.float32),
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    return path


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
    model, other = small_model(tmp_path / "m"), small_model(tmp_path / "n", seed=1)

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
