"""The plan contract with the core: a versioned ``Plan`` dict in, typed results out
(``ExecStats``, ``ShardRecord``), and the resume journal read back by the core."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fastcast
from conftest import require
from fastcast import _core

VALUES = np.array([1.0, -2.5, 7e4, 65519.0, 65520.0, -1e9, 1e-9, 0.0], np.float32)


@pytest.fixture
def source(tmp_path) -> Path:
    st = require("safetensors.numpy")
    path = tmp_path / "in.safetensors"
    st.save_file({"ids": np.arange(3, dtype=np.int64), "w": VALUES}, str(path))
    return path


def two_shard_plan(source: Path, out: Path, version: int = _core.PLAN_VERSION) -> _core.Plan:
    """``ids`` copied into one shard, ``w`` cast to F16 into another, both in a
    subfolder (as diffusers layouts have them)."""
    header = _core.read_header(source)
    start = header["data_start"]
    entries = {name: (dtype, shape, offsets) for name, dtype, shape, offsets in header["tensors"]}

    def tensor(name: str, dst: str, dst_size: int) -> _core.TensorPlan:
        dtype, shape, (begin, end) = entries[name]
        numel = int(np.prod(shape))
        return {
            "name": name,
            "shape": shape,
            "source": 0,
            "src_dtype": dtype,
            "dst_dtype": dst,
            "src_offsets": (start + begin, start + end),
            "dst_offsets": (0, numel * dst_size),
        }

    def shard(name: str, t: _core.TensorPlan) -> _core.ShardPlan:
        return {"name": name, "path": str(out / name), "metadata": [("format", "pt")],
                "tensors": [t]}  # fmt: skip

    return {
        "version": version,
        "sources": [{"path": str(source), "size": source.stat().st_size}],
        "shards": [
            shard("unet/a.safetensors", tensor("ids", "I64", 8)),
            shard("unet/b.safetensors", tensor("w", "F16", 2)),
        ],
    }


def test_execute_returns_typed_stats_and_journals_each_shard(tmp_path, source):
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    plan = two_shard_plan(source, out)
    journal = tmp_path / "journal.jsonl"
    stats = _core.execute_plan(plan, journal=journal, chunk_bytes=4)

    assert isinstance(stats, _core.ExecStats)
    assert (stats.tensors_cast, stats.tensors_copied, stats.shards_written) == (1, 1, 2)
    assert stats.bytes_read == 3 * 8 + VALUES.nbytes
    assert stats.bytes_written == sum((out / s["name"]).stat().st_size for s in plan["shards"])
    [(name, counts)] = stats.losses
    assert name == "w"
    assert counts == {"elements": 8, "overflow": 3, "underflow": 1, "nan_in": 0, "inf_in": 0,
                      "max_abs": 1e9}  # fmt: skip
    with pytest.raises(AttributeError):
        stats.tensors_cast = 0  # type: ignore[misc]

    a, b = stats.shards
    assert isinstance(a, _core.ShardRecord)
    assert (a.name, b.name) == ("unet/a.safetensors", "unet/b.safetensors")
    assert a.losses == [] and b.losses == stats.losses
    assert b.size == (out / "unet" / "b.safetensors").stat().st_size
    assert b.chunk_bytes == 4
    assert [_core.shard_digest(plan, i, 4) for i in range(2)] == [a.digest, b.digest]
    assert "ShardRecord(name='unet/a.safetensors'" in repr(a)

    assert _core.read_journal(journal) == stats.shards
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["unet/a.safetensors", "unet/b.safetensors"]
    assert lines[1]["digest"] == f"{b.digest:016x}"
    assert lines[1]["losses"] == [["w", *counts.values()]]  # rows, in LossCounts' order
    assert not list(out.rglob(f"*{_core.PARTIAL_SUFFIX}"))


def test_a_torn_or_missing_journal(tmp_path, source):
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    journal = tmp_path / "journal.jsonl"
    assert _core.read_journal(journal) == []
    stats = _core.execute_plan(two_shard_plan(source, out), journal=journal)
    text = journal.read_bytes()
    journal.write_bytes(text[:-10])  # killed while appending the second line
    assert _core.read_journal(journal) == stats.shards[:1]


def test_scan_predicts_what_execute_counts(tmp_path, source):
    plan = two_shard_plan(source, tmp_path)
    (tmp_path / "unet").mkdir()
    assert _core.scan_plan(plan) == _core.execute_plan(plan, fsync=False).losses


def test_another_plan_version_is_refused(tmp_path, source):
    plan = two_shard_plan(source, tmp_path, version=2)
    message = "plan version 2, this fastcast reads version 1"
    with pytest.raises(fastcast.FastcastError, match=message):
        _core.execute_plan(plan)
    with pytest.raises(fastcast.FastcastError, match=message):
        _core.scan_plan(plan)
    with pytest.raises(fastcast.FastcastError, match=message):
        _core.shard_digest(plan, 0, 1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_malformed_plan_is_refused(tmp_path, source):
    plan = dict(two_shard_plan(source, tmp_path))
    del plan["version"]
    with pytest.raises(fastcast.FastcastError, match=r"malformed plan: .*version"):
        _core.execute_plan(plan)  # type: ignore[arg-type]
    with pytest.raises(fastcast.FastcastError, match="malformed plan"):
        _core.scan_plan({"version": 1, "sources": "nope", "shards": []})  # type: ignore[typeddict-item]


def test_a_malformed_tensor_is_refused_naming_its_place(tmp_path, source):
    """The core reads the tensors of a plan field by field (100k of them): a bad one
    is named by shard, tensor and field, and nothing is written."""
    broken = [
        ("shape", "wide", r"shards\[1\]\.tensors\[0\]\.shape: "),
        ("src_dtype", "F33", r"shards\[1\]\.tensors\[0\]\.src_dtype: .*F33"),
        ("dst_dtype", 16, r"shards\[1\]\.tensors\[0\]\.dst_dtype: not a string"),
        ("src_offsets", (1, 2, 3), r"shards\[1\]\.tensors\[0\]\.src_offsets: not a pair"),
        ("source", -1, r"shards\[1\]\.tensors\[0\]\.source: "),
        ("name", None, r"shards\[1\]\.tensors\[0\]\.name: "),
        ("quantize", {"kind": "fp4"}, r"shards\[1\]\.tensors\[0\]\.quantize: .*fp4"),
    ]
    for field, value, message in broken:
        plan = two_shard_plan(source, tmp_path)
        plan["shards"][1]["tensors"][0][field] = value  # type: ignore[literal-required]
        with pytest.raises(fastcast.FastcastError, match="malformed plan: " + message):
            _core.execute_plan(plan)
    plan = two_shard_plan(source, tmp_path)
    del plan["shards"][0]["tensors"][0]["dst_offsets"]  # type: ignore[misc]
    with pytest.raises(fastcast.FastcastError, match=r"tensors\[0\]: missing field `dst_offsets`"):
        _core.execute_plan(plan)
    plan = two_shard_plan(source, tmp_path)
    plan["shards"][0]["tensors"] = "ids"  # type: ignore[typeddict-item]
    with pytest.raises(fastcast.FastcastError, match=r"shards\[0\]\.tensors: not a list"):
        _core.execute_plan(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_plan_read_back_from_json_runs(tmp_path, source):
    """Offsets as JSON lists, no optional fields: the plan runs as the dict did."""
    for run in ("json", "dict"):
        (tmp_path / run / "unet").mkdir(parents=True)
    plan = json.loads(json.dumps(two_shard_plan(source, tmp_path / "json")))
    assert plan["shards"][0]["tensors"][0]["src_offsets"].__class__ is list
    stats = _core.execute_plan(plan, fsync=False)
    direct = _core.execute_plan(two_shard_plan(source, tmp_path / "dict"), fsync=False)
    assert [r.digest for r in stats.shards] == [r.digest for r in direct.shards]


def as_rows(plan: _core.Plan) -> _core.Plan:
    """``plan`` with each tensor as a plain tensor's row (``PlainTensorPlan``)."""
    fields = ("name", "shape", "source", "src_dtype", "dst_dtype", "src_offsets", "dst_offsets")
    rows = json.loads(json.dumps(plan))
    for shard in rows["shards"]:
        shard["tensors"] = [tuple(t[f] for f in fields) for t in shard["tensors"]]
    return rows  # type: ignore[no-any-return]


def test_plain_tensors_as_rows_run_as_their_dicts_do(tmp_path, source):
    """A plain tensor may be a row (the planner's form: a model may have 100k): the
    files are those of the dict form, as tuples or as the lists JSON gives back."""
    digests = []
    for run in ("dict", "tuples", "lists"):
        (tmp_path / run / "unet").mkdir(parents=True)
        plan = two_shard_plan(source, tmp_path / run)
        if run != "dict":
            plan = as_rows(plan)
        if run == "lists":
            plan = json.loads(json.dumps(plan))
            assert plan["shards"][0]["tensors"][0].__class__ is list
        stats = _core.execute_plan(plan, fsync=False)
        digests.append([r.digest for r in stats.shards])
        assert [name for name, _ in stats.losses] == ["w"]
    assert digests[0] == digests[1] == digests[2]
    assert [p.read_bytes() for p in sorted((tmp_path / "dict").rglob("*.safetensors"))] == [
        p.read_bytes() for p in sorted((tmp_path / "lists").rglob("*.safetensors"))
    ]


def test_a_malformed_row_is_refused_naming_its_field(tmp_path, source):
    broken = [
        (3, "F33", r"shards\[1\]\.tensors\[0\]\.src_dtype: .*F33"),
        (5, (1, 2, 3), r"shards\[1\]\.tensors\[0\]\.src_offsets: not a pair"),
        (0, None, r"shards\[1\]\.tensors\[0\]\.name: "),
    ]
    for field, value, message in broken:
        plan = as_rows(two_shard_plan(source, tmp_path))
        row = list(plan["shards"][1]["tensors"][0])  # type: ignore[arg-type]
        row[field] = value
        plan["shards"][1]["tensors"][0] = tuple(row)  # type: ignore[call-overload]
        with pytest.raises(fastcast.FastcastError, match="malformed plan: " + message):
            _core.execute_plan(plan)
    plan = as_rows(two_shard_plan(source, tmp_path))
    plan["shards"][0]["tensors"][0] = plan["shards"][0]["tensors"][0][:6]  # type: ignore[index]
    with pytest.raises(fastcast.FastcastError, match=r"tensors\[0\]: a row of 6 fields, not 7"):
        _core.execute_plan(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_partial_names_share_one_suffix(tmp_path):
    assert _core.PARTIAL_SUFFIX == ".fastcast-partial"
    partial = _core.partial_path(tmp_path / "model.safetensors")
    assert partial == tmp_path / f".model.safetensors{_core.PARTIAL_SUFFIX}"
