"""What resuming costs: an interrupted run's finished shards are trusted when they are
still the files it synced, else checked against their journaled digests, and their
inputs are not read again: the loss counts come from the journal. Measured as the page
cache sees it: the files are evicted after the kill, and after the resume the pages of
every reused input (and output) are still not resident, while those read are."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import fastcast
from commands import cli, killed, ok
from page_cache import evict, resident

SHARDS = 10
VALUES = 1 << 18  # 1 MiB of f32 per input shard, 512 KiB of bf16 per output shard
#: Readahead of the header read (``open_model``) may bring in the start of a file.
READAHEAD = 256 << 10


def model(folder):
    """SHARDS input shards of one f32 tensor each, with an index."""
    folder.mkdir()
    weight_map = {}
    rng = np.random.default_rng(0)
    st = pytest.importorskip("safetensors.numpy")
    for i in range(SHARDS):
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensor = f"model.layers.{i}.mlp.up_proj.weight"
        values = rng.standard_normal(VALUES).astype(np.float32).reshape(512, -1)
        st.save_file({tensor: values}, str(folder / name), metadata={"format": "pt"})
        weight_map[tensor] = name
    index = {"metadata": {"total_size": SHARDS * VALUES * 4}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}')
    return folder


def test_resume_reads_no_input_of_a_reused_shard(tmp_path):
    src = model(tmp_path / "src")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    # 600 KB shards: each output shard holds exactly one input shard's tensor.
    args = ("--dtype", "bf16", "--shard-size", "600KB", "--threads", "1")
    killed(f"journaled:{SHARDS // 2}", "convert", src, "-o", out, *args)
    journal = (out / ".fastcast-staging" / "journal.jsonl").read_text().splitlines()
    done = {json.loads(line)["name"] for line in journal}
    assert SHARDS // 2 <= len(done) < SHARDS, done
    os.sync()
    inputs = sorted(src.glob("*.safetensors"))
    for f in inputs:
        evict(f)
        assert resident(f, 0, f.stat().st_size) == 0, f"{f.name} could not be evicted"

    report = fastcast.convert(src, "bf16", output=out, shard_size="600KB", resume=True,
                              progress=False)  # fmt: skip
    assert sorted(report.reused) == sorted(done)
    for f in inputs:
        data = resident(f, READAHEAD, f.stat().st_size)
        if f.name in done:  # input shard k is output shard k, cast
            assert data == 0, f"{f.name}: {data} bytes read again for a reused shard"
        else:
            assert data > 0, f"{f.name} was converted: its pages must have been read"
    again = fastcast.convert(src, "bf16", output=fresh, shard_size="600KB", progress=False)
    assert report.loss == again.loss, "the reused shards' losses come from the journal"
    for f in sorted(fresh.glob("*.safetensors")):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    assert "OK" in ok(cli("verify", out))


def test_resume_reads_no_output_of_a_reused_shard(tmp_path):
    """A staged shard that is still the file the run synced and journaled (same size,
    inode and mtime) is trusted without reading it: resuming a run killed at 90% does
    not re-read 90% of the output. One that was touched since is checked by digest."""
    src = model(tmp_path / "src")
    out = tmp_path / "out"
    args = ("--dtype", "bf16", "--shard-size", "600KB", "--threads", "1")
    killed(f"journaled:{SHARDS // 2}", "convert", src, "-o", out, *args)
    staging = out / ".fastcast-staging"
    journal = (staging / "journal.jsonl").read_text().splitlines()
    done = [json.loads(line)["name"] for line in journal]
    touched = staging / done[0]
    os.utime(touched)  # same bytes, a newer mtime: no longer provably the journaled file
    os.sync()
    for name in done:
        evict(staging / name)
        assert resident(staging / name, 0, (staging / name).stat().st_size) == 0

    report = fastcast.convert(src, "bf16", output=out, shard_size="600KB", resume=True,
                              progress=False)  # fmt: skip
    assert sorted(report.reused) == sorted(done), "the touched shard's digest still matches"
    for name in done:
        data = resident(out / name, 0, (out / name).stat().st_size)
        if name == touched.name:
            assert data > 0, f"{name} was touched after the kill: it must be re-hashed"
        else:
            assert data == 0, f"{name}: {data} bytes of a reused output read again"
    assert "OK" in ok(cli("verify", out))
