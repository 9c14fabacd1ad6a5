"""--dequantize: an fp8 checkpoint in every scheme of the reference (DeepSeek 128x128
blocks with partial edge blocks, compressed-tensors per-tensor and per-channel, FBGEMM
row-wise, vLLM per-tensor static) becomes a plain model whose every weight is the
reference math (fp32 product of the fp8 value and its block's scale) rounded once to
the target, bit for bit; the scales are gone from the shards and the index, the
quantization_config from config.json; transformers loads it with no arguments; loss
is counted after scaling; and what cannot be dequantized exactly is refused."""

from __future__ import annotations

import json

import pytest

import fastcast
from commands import cli, ok, refused
from conftest import require
from quantized import ALL, QuantModel

FP8 = ["deepseek-fp8", "ct-fp8-tensor", "ct-fp8-channel", "fbgemm-fp8", "vllm-fp8-static"]
TARGETS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_all(folder) -> dict:
    st = require("safetensors.torch")
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update(st.load_file(str(f)))
    return out


def same_bits(a, b) -> bool:
    torch = require("torch")
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


def dequantized(name: str, tmp_path, target: str) -> tuple[QuantModel, object]:
    model = ALL[name](tmp_path / "src")
    out = tmp_path / f"out-{target}"
    ok(cli("convert", model.path, "-o", out, "--dtype", target, "--dequantize"))
    return model, out


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", FP8)
def test_every_weight_is_the_reference_rounded_once(tmp_path, name, target):
    torch = require("torch")
    model, out = dequantized(name, tmp_path, target)
    want = getattr(torch, TARGETS[target])
    loaded = load_all(out)
    for weight, values in model.dequantized.items():
        assert same_bits(loaded[weight], values.to(want)), weight
    for tensor, value in model.plain.items():
        pinned = tensor.endswith("e_score_correction_bias")
        expected = value if pinned or not value.is_floating_point() else value.to(want)
        assert same_bits(loaded[tensor], expected), tensor
    pinned = {n for n, role in model.state.items() if role == "pinned fp32"}
    src = load_all(model.path)
    for tensor in pinned:  # kept fp32 by its model class: copied as it is
        assert same_bits(loaded[tensor], src[tensor]), tensor
    assert set(loaded) == set(model.dequantized) | set(model.plain) | pinned, (
        "no other state tensor is left"
    )


@pytest.mark.parametrize("name", FP8)
def test_the_output_is_a_plain_model(tmp_path, name):
    """No scale in any shard or in the index, no quantization_config at any depth, the
    dtype set, fastcast.json saying what was done; inspect sees a plain model."""
    model, out = dequantized(name, tmp_path, "bf16")
    index = out / "model.safetensors.index.json"
    names = set(load_all(out))
    if index.exists():
        assert set(json.loads(index.read_text())["weight_map"]) == names
    assert not any(n.endswith(("_scale", "_scale_inv")) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in json.dumps(config)
    assert config["torch_dtype"] == "bfloat16"
    record = json.loads((out / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "dequantize"
    assert record["quantization"]["method"] == model.method
    info = fastcast.inspect(out)
    assert info.quantization is None and not info.warnings


@pytest.mark.parametrize("name", FP8)
def test_verify_compares_with_the_reference_and_finds_a_wrong_value(tmp_path, name):
    st = require("safetensors.torch")
    model, out = dequantized(name, tmp_path, "bf16")
    assert "OK" in ok(cli("verify", out))
    weight = sorted(model.dequantized)[0]
    for f in sorted(out.rglob("*.safetensors")):
        state = st.load_file(str(f))
        if weight in state:
            state[weight].view(-1)[0] = state[weight].view(-1)[0] * 2 + 1
            st.save_file(state, str(f), metadata={"format": "pt"})
    r = cli("verify", out)
    assert r.returncode == 1 and "torch's reference dequantization" in r.stdout, r.stdout
    assert f"mismatch: {weight}" in r.stdout


@pytest.mark.parametrize("name", FP8)
def test_transformers_loads_it_with_no_arguments(tmp_path, name):
    """The dequantized model loads as a plain bf16 model, every key found, and its
    logits are those of the same checkpoint written from the reference weights."""
    torch, st = require("torch"), require("safetensors.torch")
    transformers = require("transformers")
    model, out = dequantized(name, tmp_path, "bf16")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert loaded.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = tmp_path / "reference"
    reference.mkdir()
    pinned = {n for n, role in model.state.items() if role == "pinned fp32"}
    src = load_all(model.path)
    state = {k: v.to(torch.bfloat16) for k, v in model.dequantized.items()}
    state |= {k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in model.plain.items()}  # fmt: skip
    state |= {k: src[k] for k in pinned}
    st.save_file(state, str(reference / "model.safetensors"), metadata={"format": "pt"})
    (reference / "config.json").write_bytes((out / "config.json").read_bytes())
    expected = transformers.AutoModelForCausalLM.from_pretrained(reference)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
    assert torch.equal(got, want)


def test_loss_is_counted_after_scaling_and_strict_refuses(tmp_path):
    """fp8 values fit fp16, their products with large scales do not: the overflow is
    counted on the dequantized values, and --strict refuses naming the weight."""
    st = require("safetensors.torch")
    model = ALL["deepseek-fp8"](tmp_path / "src")
    weight = sorted(model.dequantized)[0]
    scale = weight.removesuffix(".weight") + ".weight_scale_inv"
    for f in sorted(model.path.glob("*.safetensors")):
        state = st.load_file(str(f))
        if scale in state:
            state[scale] = state[scale] * 1e7
            st.save_file(state, str(f), metadata={"format": "pt"})
    report = fastcast.convert(
        model.path, "fp16", output=tmp_path / "lossy", dequantize=True, progress=False
    )
    assert {t.name for t in report.loss if t.overflow} == {weight}
    line = refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "fp16",
                       "--dequantize", "--strict"), "refusing", weight)  # fmt: skip
    assert line and not (tmp_path / "o").exists()


def test_what_cannot_be_dequantized_exactly_is_refused(tmp_path):
    bnb = ALL["bnb-nf4-dq"](tmp_path / "b")
    refused(cli("convert", bnb.path, "-o", tmp_path / "o", "--dtype", "bf16", "--dequantize"),
            "--dequantize handles")  # fmt: skip
    fp8 = ALL["deepseek-fp8"](tmp_path / "d")
    refused(cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "fp8_e4m3", "--dequantize"),
            "writes bf16, fp16, fp32")  # fmt: skip
    r = cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "bf16", "--dequantize",
            "--keep-quantized")  # fmt: skip
    assert r.returncode == 1 and "exclude each other" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_plain_model_with_dequantize_changes_nothing_and_says_so(tmp_path):
    torch, st = require("torch"), require("safetensors.torch")
    folder = tmp_path / "plain"
    folder.mkdir()
    st.save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    report = fastcast.convert(folder, "bf16", output=tmp_path / "o", dequantize=True)
    assert any("--dequantize changed nothing" in w for w in report.warnings)
