"""Hostile and broken input end to end: every file of the Rust fuzz corpus
(rust/fastcast-core/tests/corpus: lying lengths, bad UTF-8/JSON, duplicate
names, overlapping or out-of-bounds offsets, overflowing shapes, truncation...)
placed in a model folder makes `convert` fail with one clear error naming the
file, write nothing, leave the input as it was, and never crash or hang."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastcast
from folders import snapshot

CORPUS = Path(__file__).resolve().parent.parent / "rust" / "fastcast-core" / "tests" / "corpus"
CASES = sorted(p.name for p in CORPUS.glob("*.bin"))


def test_the_corpus_is_there():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES)
def test_hostile_shard_fails_cleanly(tmp_path, case):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(CORPUS / case, model / "model.safetensors")
    (model / "config.json").write_text('{"torch_dtype": "float32"}')
    before = snapshot(model)
    out = tmp_path / "out"
    with pytest.raises(fastcast.InvalidSafetensorsError) as info:
        fastcast.convert(model, "bf16", output=out, progress=False)
    assert str(model / "model.safetensors") in str(info.value)
    assert not out.exists()
    assert snapshot(model) == before
    r = subprocess.run(
        [sys.executable, "-m", "fastcast.cli", "convert", str(model), "-o", str(out), "-d", "bf16"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcast: error: "), r.stderr
    assert "model.safetensors" in lines[0]
