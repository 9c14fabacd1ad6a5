"""README's quick start, run as written (but for the install, which CI does first, and
into a temporary folder): every line it shows is the line the commands print, but for
the seconds and the speed, which no two runs share."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> tuple[str, list[str]]:
    """The quick start's command line and the lines README shows it printing."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = section.split("```console\n", 1)[1].split("```", 1)[0]
    command, *printed = block.rstrip("\n").split("\n")
    assert command.startswith("$ "), command
    return command[2:], printed


def normalized(line: str) -> str:
    """A printed line with its timing figures blanked: ``time: 0.1 s (2.1 GB/s)``."""
    return re.sub(r"time: [\d.]+ s \([\d.]+ [kMGT]?B/s\)", "time: N s (N B/s)", line)


def test_the_quick_start_prints_what_readme_shows(tmp_path):
    command, shown = quick_start()
    steps = [shlex.split(part) for part in command.split(" && ")]
    assert steps[0][:2] == ["pip", "install"], "the quick start begins with the install"
    folder = "/tmp/tiny-llama"
    assert any(folder in arg for step in steps for arg in step)
    printed: list[str] = []
    for step in steps[1:]:
        args = [a.replace(folder, str(tmp_path / "tiny-llama")) for a in step]
        if args[0] == "python3":
            args[0] = sys.executable
        elif args[0] == "fastcast":
            args[:1] = [sys.executable, "-m", "fastcast.cli"]
        r = subprocess.run(args, capture_output=True, text=True, check=False, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        printed += r.stdout.rstrip("\n").split("\n")
    want = [normalized(ln.replace(folder, str(tmp_path / "tiny-llama"))) for ln in shown]
    assert [normalized(ln) for ln in printed] == want
