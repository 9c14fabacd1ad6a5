"""``fastcast verify`` on the CPU: a good conversion passes; each kind of damage
(a flipped byte, a missing tensor, a wrong shape, a stale config dtype, a stray
half-written file) fails with a message naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastcast
from conftest import require
from folders import save_folder, tensors


@pytest.fixture(scope="module")
def st_torch():
    return require("safetensors.torch")


@pytest.fixture
def converted(tmp_path, torch, st_torch):
    state = tensors(torch)
    state["model.layers.0.mlp.weight"][0, :3] = torch.tensor([float("nan"), 1e30, -1e-42])
    src = save_folder(st_torch, tmp_path / "model", state, shards=2)
    out = tmp_path / "out"
    fastcast.convert(src, "bf16", output=out, shard_size="20KB", progress=False)
    return src, out


def rewrite(st, out: Path, change) -> None:
    """Load every output shard, let ``change`` edit the dict, save it back."""
    for f in sorted(out.glob("*.safetensors")):
        state = st.load_file(str(f))
        change(state, f.name)
        st.save_file(state, str(f), metadata={"format": "pt"})


def test_a_good_conversion_verifies(converted):
    src, out = converted
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert report.ok, report.summary()
    assert report.dtype == "BF16" and report.device.startswith("cpu")
    assert report.tensors_checked == 10
    assert "OK" in report.summary()


def test_one_flipped_byte_is_found(converted):
    src, out = converted
    shard = sorted(out.glob("model-*.safetensors"))[0]
    header = fastcast.read_header(shard)
    name, _, shape, (begin, _) = next(t for t in header["tensors"] if t[1] == "BF16")
    raw = bytearray(shard.read_bytes())
    raw[header["data_start"] + begin + 1] ^= 0x01  # high byte of the first element
    shard.write_bytes(bytes(raw))
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert not report.ok
    assert len(report.mismatches) == 1
    m = report.mismatches[0]
    assert m.name == name and m.count == 1 and m.file == shard.name
    assert m.index == (0,) * len(shape)
    assert f"mismatch: {name}" in report.summary()


def test_a_changed_integer_is_found(converted, st_torch):
    src, out = converted

    def bump(state, _):
        if "model.step" in state:
            state["model.step"][1] += 1

    rewrite(st_torch, out, bump)
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert [m.name for m in report.mismatches] == ["model.step"]
    assert report.mismatches[0].got == -2 and report.mismatches[0].want == -3


def test_a_missing_tensor_is_found(converted, st_torch):
    src, out = converted

    def drop(state, _):
        state.pop("model.layers.2.norm.weight", None)

    rewrite(st_torch, out, drop)
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.2.norm.weight"]
    index.write_text(json.dumps(data))
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert "tensor 'model.layers.2.norm.weight' is missing from the output" in report.problems
    assert any("total_size" in p for p in report.problems)


def test_a_wrong_shape_is_found(converted, st_torch):
    src, out = converted

    def reshape(state, _):
        if "model.embed_tokens.weight" in state:
            state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].reshape(64, 32)

    rewrite(st_torch, out, reshape)
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert any(
        "'model.embed_tokens.weight'" in p and "shape [64, 32], the source [32, 64]" in p
        for p in report.problems
    ), report.problems


def test_a_stale_config_dtype_is_found(converted):
    src, out = converted
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert report.problems == [
        f"{out / 'config.json'}: says torch_dtype=float32, but the weights are BF16 (bfloat16)"
    ]


def test_a_wrong_dtype_and_stray_files_are_found(converted, st_torch, torch):
    src, out = converted

    def widen(state, _):
        if "model.layers.1.mlp.weight" in state:
            state["model.layers.1.mlp.weight"] = state["model.layers.1.mlp.weight"].float()

    rewrite(st_torch, out, widen)
    (out / ".model-00001-of-00009.safetensors.fastcast-partial").write_bytes(b"x")
    (out / "tokenizer.json").unlink()
    report = fastcast.verify(out, against=src, device="cpu", progress=False)
    assert any("stored as F32, expected BF16" in p for p in report.problems)
    assert any("half-written" in p for p in report.problems)
    assert any("tokenizer.json: in the source but not in the output" in p for p in report.problems)


def test_cli_verify_and_convert_verify(tmp_path, converted):
    src, out = converted
    run = [sys.executable, "-m", "fastcast.cli"]
    ok = subprocess.run(
        [*run, "verify", str(out), "--against", str(src), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stderr
    both = subprocess.run(
        [*run, "convert", str(src), "-o", str(tmp_path / "again"), "--dtype", "fp16", "--verify"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert both.returncode == 0, both.stderr
    assert "converted" in both.stdout and "(F16): OK" in both.stdout
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config))
    bad = subprocess.run(
        [*run, "verify", str(out), "--against", str(src), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "torch_dtype=float16" in bad.stdout


def test_load_check_on_a_transformers_model(tmp_path, torch):
    require("transformers")
    from models import build_llama

    src = build_llama(tmp_path / "llama")
    out = tmp_path / "llama-bf16"
    fastcast.convert(src, "bf16", output=out, progress=False)
    report = fastcast.verify(out, against=src, load=True, device="cpu", progress=False)
    assert report.ok, report.summary()
    assert report.load and report.load["cpu"] > 0
    assert "load: the whole model loaded (cpu:" in report.summary()


def test_bad_device_is_a_clear_error(converted, torch):
    src, out = converted
    with pytest.raises(fastcast.FastcastError, match="--device cuda:99: "):
        fastcast.verify(out, against=src, device="cuda:99", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(fastcast.FastcastError, match="torch sees no CUDA device"):
            fastcast.verify(out, against=src, device="cuda", progress=False)
