"""The fastcast command as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import fastcast


def run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("fastcast")
    cmd = [exe] if exe else [sys.executable, "-m", "fastcast.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastcast {fastcast.__version__}"
    r = run("--help")
    assert r.returncode == 0 and "dtypes" in r.stdout


def test_command_is_installed():
    assert shutil.which("fastcast"), "pip install should put a fastcast command on PATH"


def test_python_dash_m_runs_the_command():
    r = subprocess.run([sys.executable, "-m", "fastcast", "--version"], capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == f"fastcast {fastcast.__version__}", r.stderr
    r = subprocess.run([sys.executable, "-m", "fastcast"], capture_output=True, text=True,
                       check=False)  # fmt: skip
    assert r.returncode == 2 and "usage: fastcast" in r.stdout


def test_dtypes_lists_names_and_kernels():
    r = run("dtypes")
    assert r.returncode == 0, r.stderr
    assert "BF16" in r.stdout and "bfloat16" in r.stdout and "copied as is" in r.stdout
    assert "kernels on this CPU: scalar" in r.stdout


def test_no_command_prints_help_and_fails():
    r = run()
    assert r.returncode == 2 and "usage: fastcast" in r.stdout
