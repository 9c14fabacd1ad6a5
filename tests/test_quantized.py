"""Quantized checkpoints are never corrupted: every format of the reference (fp8 block,
compressed-tensors, FBGEMM, vLLM static, bitsandbytes 4-bit and 8-bit, GPTQ, AWQ; see
quantized.py) is refused by a plain cast with one line naming the method, converts
with --keep-quantized keeping every quantization tensor byte for byte, is described by
inspect (method, scheme, roles) without a false warning, and verify tells a blanket
cast apart from a right conversion."""

from __future__ import annotations

import json
import shutil

import pytest

import fastcast
from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import ALL, QuantModel

#: The target --keep-quantized writes for each method (GPTQ/AWQ need fp16, FBGEMM bf16).
KEEP_TARGET = {"gptq": "fp16", "awq": "fp16", "fbgemm_fp8": "bf16"}


@pytest.fixture(params=sorted(ALL))
def model(request, tmp_path) -> QuantModel:
    return ALL[request.param](tmp_path / "src")


def raw_tensors(folder) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in every shard of a folder."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        header = fastcast.read_header(f)
        data = f.read_bytes()
        for name, dtype, shape, (b, e) in header["tensors"]:
            start = header["data_start"]
            out[name] = (dtype, shape, data[start + b : start + e])
    return out


def assert_kept(model: QuantModel, out, target: str):
    """``out`` holds every tensor of ``model``: its state byte for byte, the rest cast
    to ``target`` as torch casts it. Returns the target's torch dtype."""
    torch, st = require("torch"), require("safetensors.torch")
    src, dst = raw_tensors(model.path), raw_tensors(out)
    assert set(dst) == set(src), "nothing dropped, nothing added"
    for name in model.state:
        assert dst[name] == src[name], f"{name} ({model.state[name]}) changed"
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[target]
    loaded = {}
    for f in sorted(out.rglob("*.safetensors")):
        loaded.update(st.load_file(str(f)))
    for name, t in model.plain.items():
        expected = t.to(want) if t.is_floating_point() else t
        assert loaded[name].dtype == expected.dtype, name
        assert torch.equal(loaded[name].view(torch.uint8), expected.view(torch.uint8)), name
    return want


def blanket_cast(model: QuantModel, out) -> bool:
    """Write into ``out`` what a blanket cast to bf16 makes of ``model`` (every float
    tensor cast, scales included; the other files copied). Returns whether any state
    tensor changed (a float not in bf16 already)."""
    torch, st = require("torch"), require("safetensors.torch")
    out.mkdir()
    state_is_float = False
    for f in sorted(model.path.glob("*.safetensors")):
        state = st.load_file(str(f))
        state_is_float |= any(state[n].is_floating_point() and state[n].dtype != torch.bfloat16
                              for n in model.state if n in state)  # fmt: skip
        cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}
        st.save_file(cast, str(out / f.name), metadata={"format": "pt"})
    for f in model.path.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return state_is_float


def target_of(model: QuantModel) -> str:
    return KEEP_TARGET.get(model.method or "", "fp16" if model.dtype == "bfloat16" else "bf16")


def test_a_plain_cast_is_refused_naming_the_method(model, tmp_path):
    before = snapshot(model.path)
    out = tmp_path / "out"
    line = refused(cli("convert", model.path, "-o", out, "--dtype", "bf16"), "--keep-quantized")
    assert "quantized with" in line and "would corrupt it" in line
    if model.method:
        assert model.method in line
    assert not out.exists() and snapshot(model.path) == before


def test_keep_quantized_keeps_every_state_tensor_byte_for_byte(model, tmp_path):
    out = tmp_path / "out"
    target = target_of(model)
    ok(cli("convert", model.path, "-o", out, "--dtype", target, "--keep-quantized"))
    want = assert_kept(model, out, target)
    source_config = json.loads((model.path / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == source_config["quantization_config"]
    assert config["torch_dtype"] == str(want).removeprefix("torch.")
    record = json.loads((out / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "keep"
    assert "OK" in ok(cli("verify", out))


def test_inspect_names_the_quantization_and_drops_the_false_warning(model):
    stdout = ok(cli("inspect", model.path))
    assert "quantized: " in stdout and "role" in stdout
    if model.method:
        assert f"quantized: {model.method} (" in stdout
    assert "config.json says" not in stdout, "a quantized model's weights are not its dtype"
    info = fastcast.inspect(model.path)
    roles = {r.role for r in info.roles}
    assert set(model.state.values()) <= roles


def test_verify_calls_a_blanket_cast_what_it_is(model, tmp_path):
    """What fastcast 0.1 wrote (every float tensor cast, scales included) fails verify
    with a message that says the scales were not applied."""
    out = tmp_path / "blanket"
    blanket_cast(model, out)
    r = cli("verify", out, "--against", model.path, "--dtype", "bf16")
    assert r.returncode == 1 and "a blanket cast" in r.stdout, r.stdout + r.stderr


def test_detected_without_a_quantization_config(model, tmp_path):
    """A checkpoint whose config.json lost its quantization_config (or never had one) is
    still recognised by its tensors."""
    config = json.loads((model.path / "config.json").read_text())
    del config["quantization_config"]
    (model.path / "config.json").write_text(json.dumps(config))
    line = refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16"))
    assert "tensor names" in line


def test_a_nested_quantization_config_is_found(tmp_path):
    model = ALL["deepseek-fp8"](tmp_path / "src")
    config = json.loads((model.path / "config.json").read_text())
    config["text_config"] = {"model_type": "deepseek_v3", "quantization_config":
                             config.pop("quantization_config")}  # fmt: skip
    (model.path / "config.json").write_text(json.dumps(config))
    line = refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16"))
    assert "config.json (text_config)" in line


def test_keep_quantized_refuses_what_would_break_anyway(tmp_path):
    gptq = ALL["gptq-v1"](tmp_path / "g")
    line = refused(cli("convert", gptq.path, "-o", tmp_path / "o", "--dtype", "bf16",
                       "--keep-quantized"), "fp16")  # fmt: skip
    assert "kernels" in line
    fp8 = ALL["deepseek-fp8"](tmp_path / "d")
    refused(cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "fp8_e4m3",
                "--keep-quantized"), "raw fp8")  # fmt: skip
    config = json.loads((fp8.path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (fp8.path / "config.json").write_text(json.dumps(config))
    refused(cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "bf16",
                "--keep-quantized"), "hqq", "does not know")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_keep_quantized_on_a_plain_model_changes_nothing_and_says_so(tmp_path):
    torch, st = require("torch"), require("safetensors.torch")
    folder = tmp_path / "plain"
    folder.mkdir()
    st.save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    report = fastcast.convert(folder, "bf16", output=tmp_path / "o", keep_quantized=True)
    assert any("not quantized" in w for w in report.warnings)


def test_the_dtype_inside_quantization_config_is_never_retyped():
    """A quantization_config's own dtype keys (bnb_4bit_compute_dtype, a scheme's dtype)
    belong to the quantization, not to the weights: keep-quantized leaves them."""
    from fastcast._source.config import retype_config

    config = {"model_type": "llama", "torch_dtype": "float32",
              "quantization_config": {"quant_method": "bitsandbytes", "dtype": "int4",
                                      "bnb_4bit_compute_dtype": "float16"}}  # fmt: skip
    retyped = retype_config(config, "bfloat16")
    assert retyped["quantization_config"] == config["quantization_config"]
    assert retyped["torch_dtype"] == "bfloat16"
