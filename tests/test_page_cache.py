"""The page cache after a conversion is as the conversion found it: the input pages a
run brought in are dropped behind it (a model larger than RAM otherwise fills the cache
and every later read waits for reclaim; see benches/bench_cold.py), and an input that
was cached stays cached (converting the same model twice, or right after download)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from commands import cli, ok
from page_cache import evict, resident

SHARDS = 2
TENSORS = 3
VALUES = 3 << 20  # 12 MiB of f32 per tensor, 36 MiB per input shard
#: The run keeps the 2 MiB block holding each file's header, which the header read
#: brought in before the run began (so it was cached); and a little fault-around.
KEPT = (2 << 20) + (256 << 10)


def model(folder):
    folder.mkdir()
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {
            f"model.layers.{s * TENSORS + t}.mlp.up_proj.weight": rng.standard_normal(
                VALUES, dtype=np.float32
            ).reshape(1024, -1)
            for t in range(TENSORS)
        }
        st.save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}')
    return sorted(folder.glob("*.safetensors"))


def cached(files) -> list[int]:
    return [resident(f, 0, f.stat().st_size) for f in files]


def test_a_cold_input_leaves_the_page_cache_as_it_was(tmp_path):
    inputs = model(tmp_path / "src")
    os.sync()
    for f in inputs:
        evict(f)
    assert cached(inputs) == [0] * SHARDS, "the inputs could not be evicted"
    ok(cli("convert", tmp_path / "src", "-o", tmp_path / "out", "--dtype", "bf16",
           "--shard-size", "20MB"))  # fmt: skip
    for f, left in zip(inputs, cached(inputs), strict=True):
        assert left <= KEPT, f"{f.name}: {left >> 10} KiB of {f.stat().st_size >> 10} left cached"


def test_a_cached_input_stays_cached(tmp_path):
    inputs = model(tmp_path / "src")
    for f in inputs:
        f.read_bytes()
    sizes = [f.stat().st_size for f in inputs]
    assert cached(inputs) == [s // 4096 * 4096 for s in sizes], "the inputs are not cached"
    ok(cli("convert", tmp_path / "src", "-o", tmp_path / "out", "--dtype", "bf16",
           "--shard-size", "20MB"))  # fmt: skip
    assert cached(inputs) == [s // 4096 * 4096 for s in sizes]
