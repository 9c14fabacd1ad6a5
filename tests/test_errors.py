"""Errors cross from Rust as the classes a Python user expects: OS errors keep
``errno`` and ``filename`` and pick their built-in subclass, a full disk is both a
fastcast error and an OSError, and a refusal names the tensors that overflowed."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import subprocess
import sys

import pytest

import fastcast
from fastcast import _core


def test_a_missing_file_is_file_not_found_with_errno_and_filename(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        _core.read_header(path)
    e = info.value
    assert e.errno == errno.ENOENT
    assert e.filename == str(path)
    assert e.strerror == os.strerror(errno.ENOENT)  # the OS's words, no "(os error 2)"
    assert "os error" not in str(e) and str(path) in str(e)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(IsADirectoryError) as info:
        _core.read_header(tmp_path)
    assert info.value.errno == errno.EISDIR and info.value.filename == str(tmp_path)


READ_LOCKED = """
import errno, sys
from fastcast import _core
try:
    _core.read_header(sys.argv[1])
except PermissionError as e:
    assert e.errno == errno.EACCES and e.filename == sys.argv[1], (e.errno, e.filename)
    print("PermissionError")
"""


def test_an_unreadable_file_is_permission_error(tmp_path):
    path = tmp_path / "locked.safetensors"
    path.write_bytes(b"\0" * 16)
    path.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(PermissionError) as info:
                _core.read_header(path)
            assert info.value.errno == errno.EACCES and info.value.filename == str(path)
            return
        if shutil.which("setpriv") is None:
            pytest.skip("root reads any file; dropping that needs setpriv")
        # Root without the capabilities that bypass file permissions.
        r = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
             sys.executable, "-c", READ_LOCKED, str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if r.returncode != 0 and "setpriv" in r.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {r.stderr.strip()}")
        assert r.returncode == 0 and r.stdout.strip() == "PermissionError", r.stderr
    finally:
        path.chmod(0o644)


def test_insufficient_space_is_a_fastcast_error_and_an_os_error():
    cls = fastcast.InsufficientSpaceError
    assert issubclass(cls, OSError) and issubclass(cls, fastcast.FastcastError)
    assert cls.__module__ == "fastcast" and cls.__name__ == "InsufficientSpaceError"
    e = cls(errno.ENOSPC, "not enough disk space: the output needs 2 GB, 1 GB is free", "/o")
    assert isinstance(e, cls), "a subclass is not re-mapped by errno"
    assert (e.errno, e.filename) == (errno.ENOSPC, "/o")
    assert e.strerror.startswith("not enough disk space")
    with pytest.raises(OSError):
        raise e
    plain = cls("/o: not enough disk space")  # one argument: a message
    assert plain.errno is None and str(plain) == "/o: not enough disk space"


def test_loss_error_carries_the_tensors():
    e = fastcast.LossError("m", [("a", 3)])
    assert e.tensors == [("a", 3)] and str(e) == "m"
    assert isinstance(e, fastcast.FastcastError)
    assert fastcast.LossError("m").tensors == []
    assert fastcast.LossError("m", tensors=[["b", 1]]).tensors == [("b", 1)]
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is fastcast.LossError and again.tensors == [("a", 3)]
    assert fastcast.LossError.__module__ == "fastcast"
    assert fastcast.LossError.__qualname__ == "LossError"


def test_other_errors_keep_their_classes(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05")
    with pytest.raises(fastcast.InvalidSafetensorsError, match="too short"):
        _core.read_header(bad)
    with pytest.raises(fastcast.DtypeError):
        _core.parse_dtype("bf17")
