"""Reading safetensors headers: files written by the safetensors library
are read back exactly; corrupt and hostile ones fail with the file named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import fastcast
from conftest import require


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    st = require("safetensors.numpy")
    tensors = {
        "embed.weight": np.ones((4, 3), np.float32),
        "norm.weight": np.ones(3, np.float16),
        "step": np.array(7, np.int64),
        "mask": np.zeros((2, 2), np.bool_),
    }
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "pt"})
    header = fastcast.read_header(path)
    assert header["metadata"] == {"format": "pt"}
    by_name = {name: (dtype, shape, offsets) for name, dtype, shape, offsets in header["tensors"]}
    assert by_name["embed.weight"][:2] == ("F32", [4, 3])
    assert by_name["norm.weight"][:2] == ("F16", [3])
    assert by_name["step"][:2] == ("I64", [])
    assert by_name["mask"][:2] == ("BOOL", [2, 2])
    data = path.read_bytes()[header["data_start"] :]
    begin, end = by_name["embed.weight"][2]
    np.testing.assert_array_equal(np.frombuffer(data[begin:end], np.float32), np.ones(12))


def test_entries_are_the_header_in_data_order_with_absolute_offsets(tmp_path):
    """``read_entries`` (what a conversion reads) against ``read_header``: the same
    tensors, offsets made absolute, sorted by data position, ties (empty tensors at
    one offset) in the header's order, one ``file`` object shared by every row."""
    header = {
        "__metadata__": {"format": "pt"},
        "z.first": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a.last": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [12, 18]},
        "m.empty": {"dtype": "F16", "shape": [0], "data_offsets": [8, 8]},
        "b.empty": {"dtype": "I64", "shape": [2, 0], "data_offsets": [8, 8]},
        "k.mid": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
    }
    path = write_raw(tmp_path / "m.safetensors", header, bytes(range(18)))
    old = fastcast.read_header(path)
    start = old["data_start"]
    expected = sorted(
        (
            (n, d, tuple(s), path, (start + b, start + e), None)
            for n, d, s, (b, e) in old["tensors"]
        ),
        key=lambda row: row[4],
    )
    empty = write_raw(tmp_path / "n", {})
    [(metadata, entries), (no_metadata, none)] = fastcast._core.read_entries([path, empty])
    rows = entries.rows()
    assert metadata == old["metadata"] == {"format": "pt"}
    assert rows == expected
    assert entries.names() == [r[0] for r in rows] and len(entries) == len(rows)
    assert entries.file is path
    assert [r[0] for r in rows] == ["z.first", "m.empty", "b.empty", "k.mid", "a.last"]
    assert all(r[3] is path for r in rows)
    assert no_metadata is None and none.rows() == [] and len(none) == 0


def test_entries_of_many_files_tell_the_first_bad_one(tmp_path):
    """The headers are read in parallel; the error is the first bad file's, in the
    order given, whichever thread finishes first."""
    good = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    files = [write_raw(tmp_path / f"{i}.safetensors", good, bytes(4)) for i in range(6)]
    for bad in (files[2], files[4]):
        bad.write_bytes(bad.read_bytes()[:-1])
    for _ in range(20):
        with pytest.raises(fastcast.InvalidSafetensorsError, match=r"2\.safetensors"):
            fastcast._core.read_entries(files)


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        ({"a": GOOD_ENTRY}, b"\0" * 4, None, "past the end of the data"),
        ({"a": GOOD_ENTRY}, b"\0" * 12, None, "4 bytes after the last tensor"),
        ({"a": {**GOOD_ENTRY, "dtype": "F33"}}, b"\0" * 8, None, 'unknown dtype "F33"'),
        ({"a": {**GOOD_ENTRY, "shape": [3]}}, b"\0" * 8, None, "needs 12"),
        (
            {"a": {**GOOD_ENTRY, "shape": [2**62, 2**62]}},
            b"\0" * 8,
            None,
            "more elements than fit",
        ),
        (
            {"a": GOOD_ENTRY, "b": {**GOOD_ENTRY, "data_offsets": [4, 12]}},
            b"\0" * 12,
            None,
            "overlaps",
        ),
        ('{"a": 1, "a": 2}', b"", None, "listed twice"),
        ("not json at all", b"", None, "not valid JSON"),
        ({"__metadata__": {"x": 1}}, b"", None, "__metadata__ must map strings"),
        ({}, b"", 10**9, "exceeds the 100000000-byte limit"),
        ({}, b"", 5000, "runs past the end of the file"),
    ],
)
def test_hostile_headers_are_rejected_with_the_file_named(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    before = path.read_bytes()
    with pytest.raises(fastcast.InvalidSafetensorsError, match=message) as info:
        fastcast.read_header(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


def test_non_utf8_and_tiny_files(tmp_path):
    bad = tmp_path / "latin1.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b'{"\xe9"')
    with pytest.raises(fastcast.InvalidSafetensorsError, match="not valid UTF-8"):
        fastcast.read_header(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(fastcast.InvalidSafetensorsError, match="too short"):
        fastcast.read_header(tiny)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        fastcast.read_header(tmp_path / "nope.safetensors")


def test_exceptions_form_a_hierarchy():
    assert issubclass(fastcast.InvalidSafetensorsError, fastcast.FastcastError)
    assert issubclass(fastcast.DtypeError, fastcast.FastcastError)
