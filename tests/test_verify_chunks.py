"""verify compares in bounded chunks: cut anywhere a format allows, the verdict is the
same as comparing whole tensors, and a wrong element is named with its tensor and its
index whichever chunk it falls in. Every dequantized format and both --quantize
schemes are checked with chunks of a few rows, plain runs with chunks that straddle
tensors."""

from __future__ import annotations

import math

import pytest

import fastcast
import fastcast._verify.verify
from commands import cli, ok
from conftest import require
from folders import raw_tensors, save_folder, tensors
from quantized import ALL


@pytest.fixture(params=[96, 5000])
def tiny_chunks(monkeypatch, request):
    """verify in chunks of 96 or 5000 elements (each format rounds up to its own units:
    a row, 32 rows, a block row): a row at a time, or several rows that a format's
    blocks do not divide."""
    monkeypatch.setattr(fastcast._verify.verify, "CHUNK_ELEMENTS", request.param)
    monkeypatch.setattr(fastcast._verify.verify, "MIN_CHUNK_ELEMENTS", 1)


def corrupt(path, name: str, element: int, width: int) -> None:
    """Flip the low bit of element ``element`` of tensor ``name`` in place."""
    header = fastcast.read_header(path)
    begin = next(b for n, _, _, (b, _) in header["tensors"] if n == name)
    at = header["data_start"] + begin + element * width
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))


def shard_of(out, name: str):
    for shard in sorted(out.rglob("*.safetensors")):
        if name in raw_tensors(shard):
            return shard
    raise AssertionError(name)


def check_corruption_is_found(out, name: str, shape: tuple[int, ...], width: int) -> None:
    """A wrong element in the middle of ``name``, then at its very end: found, alone, at
    its index."""
    shard = shard_of(out, name)
    numel = math.prod(shape)
    for element in sorted({numel // 2, numel - 1}):
        corrupt(shard, name, element, width)
        report = fastcast.verify(out, device="cpu", progress=False)
        assert [m.name for m in report.mismatches] == [name], report.summary()
        m = report.mismatches[0]
        assert m.count == 1 and m.numel == numel
        index, rest = [], element
        for dim in reversed(shape):
            index.append(rest % dim)
            rest //= dim
        assert list(m.index) == index[::-1]
        corrupt(shard, name, element, width)  # put it back
    assert fastcast.verify(out, device="cpu", progress=False).ok


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_dequantized_format_in_chunks_of_a_few_rows(tmp_path, tiny_chunks, name):
    require("torch")
    model = ALL[name](tmp_path / "src")
    out = tmp_path / "out"
    ok(cli("convert", model.path, "-o", out, "--dtype", "fp32", "--dequantize"))
    report = fastcast.verify(out, device="cpu", progress=False)
    assert report.ok, report.summary()
    weight = sorted(model.dequantized)[0]
    check_corruption_is_found(out, weight, tuple(model.original[weight].shape), 4)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_quantized_values_and_scales_in_chunks(tmp_path, tiny_chunks, scheme):
    torch = require("torch")
    st = require("safetensors.torch")
    g = torch.Generator().manual_seed(4)
    state = {
        "model.layers.0.mlp.down_proj.weight": torch.randn(384, 256, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 384, generator=g),
        "model.norm.weight": torch.ones(256),
    }
    model = save_folder(st, tmp_path / "model", state)
    out = tmp_path / "out"
    ok(cli("convert", model, "-o", out, "--dtype", "bf16", "--quantize", scheme))
    assert fastcast.verify(out, device="cpu", progress=False).ok
    name = "model.layers.0.mlp.down_proj.weight"
    check_corruption_is_found(out, name, (384, 256), 1)
    scale = name + ("_scale_inv" if scheme == "fp8" else "_scale")
    grid = (3, 2) if scheme == "fp8" else (384, 1)
    check_corruption_is_found(out, scale, grid, 4)


def test_a_run_of_tensors_cut_across_their_bounds(tmp_path, tiny_chunks):
    """Many tensors compared as one run, chunks straddling them: a wrong element is
    told to its own tensor, a wrong copied integer too."""
    torch = require("torch")
    st = require("safetensors.torch")
    model = save_folder(st, tmp_path / "model", tensors(torch, n_layers=6, width=20), shards=2)
    out = tmp_path / "out"
    ok(cli("convert", model, "-o", out, "--dtype", "bf16", "--shard-size", "2KB"))
    assert fastcast.verify(out, device="cpu", progress=False).ok
    check_corruption_is_found(out, "model.layers.3.mlp.weight", (20, 20), 2)
    check_corruption_is_found(out, "model.step", (2,), 8)
