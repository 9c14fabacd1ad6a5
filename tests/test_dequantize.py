"""--dequantize: a quantized checkpoint in every format of the reference (fp8: DeepSeek
128x128 blocks with partial edge blocks, compressed-tensors per-tensor and per-channel,
FBGEMM row-wise, vLLM per-tensor static; bitsandbytes nf4/fp4 with and without double
quant, in uint8 and bf16 storage, and LLM.int8; GPTQ v1, v1 with desc_act, v2; AutoAWQ
GEMM) becomes a plain model whose every weight is the reference math
(``quantized.dequantize_folder``, itself checked bit for bit against bitsandbytes,
AutoGPTQ and compressed-tensors) rounded once to the target, bit for bit; the state
tensors are gone from the shards and the index, the quantization_config from
config.json; transformers loads it with no arguments; loss is counted after scaling;
and what cannot be dequantized exactly is refused with one line, nothing written."""

from __future__ import annotations

import json

import pytest

import fastcast
from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import ALL, QuantModel, dequantize_folder, load_all, same_bits

FP8 = ["deepseek-fp8", "ct-fp8-tensor", "ct-fp8-channel", "fbgemm-fp8", "vllm-fp8-static"]
BNB = ["bnb-nf4-dq", "bnb-fp4", "bnb-nf4-bf16-storage", "bnb-int8"]
PACKED = ["gptq-v1", "gptq-v1-desc-act", "gptq-v2", "awq"]
EVERY = FP8 + BNB + PACKED
assert sorted(EVERY) == sorted(ALL), "every quantized fixture is dequantized"
TARGETS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dequantized(name: str, tmp_path, target: str) -> tuple[QuantModel, object]:
    model = ALL[name](tmp_path / "src")
    out = tmp_path / f"out-{target}"
    ok(cli("convert", model.path, "-o", out, "--dtype", target, "--dequantize"))
    return model, out


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", EVERY)
def test_every_weight_is_the_reference_rounded_once(tmp_path, name, target):
    torch = require("torch")
    model, out = dequantized(name, tmp_path, target)
    want = getattr(torch, TARGETS[target])
    loaded = load_all(out)
    for weight in model.dequantized:
        reference = dequantize_folder(model.path, weight)
        assert reference.shape == model.original[weight].shape  # [out, in]
        assert same_bits(loaded[weight], reference.to(want)), weight
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


@pytest.mark.parametrize("name", EVERY)
def test_the_output_is_a_plain_model(tmp_path, name):
    """No state tensor (scale, absmax, quant map, quant state, SCB, weight_format, qzeros,
    scales, g_idx, qweight) in any shard or in the index, no quantization_config at any
    depth, the dtype set, fastcast.json saying what was done; inspect sees a plain
    model."""
    model, out = dequantized(name, tmp_path, "bf16")
    index = out / "model.safetensors.index.json"
    names = set(load_all(out))
    if index.exists():
        assert set(json.loads(index.read_text())["weight_map"]) == names
    state = {n for n, role in model.state.items() if role != "pinned fp32"}
    assert not names & (state - set(model.dequantized)), "a state tensor is left"
    assert not any(
        n.endswith(("_scale", "_scale_inv", ".SCB", ".weight_format", ".qweight", ".qzeros",
                    ".scales", ".g_idx", ".absmax", ".quant_map")) or ".quant_state." in n
        for n in names
    )  # fmt: skip
    assert set(fastcast._core.quant_roles(sorted(names))) <= {"plain", "pinned fp32"}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in json.dumps(config)
    assert config["torch_dtype"] == "bfloat16"
    record = json.loads((out / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "dequantize"
    assert record["quantization"]["method"] == model.method
    info = fastcast.inspect(out)
    assert info.quantization is None and not info.warnings


@pytest.mark.parametrize("name", EVERY)
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


@pytest.mark.parametrize("name", EVERY)
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
    fp8 = ALL["deepseek-fp8"](tmp_path / "d")
    refused(cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "fp8_e4m3", "--dequantize"),
            "writes bf16, fp16, fp32")  # fmt: skip
    r = cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "bf16", "--dequantize",
            "--keep-quantized")  # fmt: skip
    assert r.returncode == 1 and "exclude each other" in r.stderr
    assert not (tmp_path / "o").exists()
    config = json.loads((fp8.path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (fp8.path / "config.json").write_text(json.dumps(config))
    refused(cli("convert", fp8.path, "-o", tmp_path / "o", "--dtype", "bf16", "--dequantize"),
            "hqq", "--dequantize handles")  # fmt: skip
    assert not (tmp_path / "o").exists()


def set_quantization_config(model: QuantModel, **changes) -> None:
    config = json.loads((model.path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (model.path / "config.json").write_text(json.dumps(config))


def convert_refused(model: QuantModel, tmp_path, *words: str) -> str:
    """--dequantize refused with one line naming ``words``; nothing written, the source
    untouched."""
    before = snapshot(model.path)
    out = tmp_path / "refused"
    line = refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"),
                   *words)  # fmt: skip
    assert not out.exists() and snapshot(model.path) == before
    return line


def test_gptq_that_is_not_unpacked_exactly_is_refused(tmp_path):
    """3-bit GPTQ packs values across int32 words: refused, saying so; likewise a format,
    group size or per-module override fastcast does not read, and a config-less folder
    (whose qweight could be GPTQ or AWQ)."""
    gptq = ALL["gptq-v1"](tmp_path / "g")
    x = "model.layers.0.mlp.down_proj.qweight"  # the first in the file
    set_quantization_config(gptq, bits=3)
    line = convert_refused(gptq, tmp_path, x, "3-bit", "straddle")
    assert "does not reconstruct exactly" in line and "nothing was written" in line
    set_quantization_config(gptq, bits=4, checkpoint_format="marlin")
    convert_refused(gptq, tmp_path, x, "marlin")
    set_quantization_config(gptq, checkpoint_format="gptq", group_size=16)  # scales are for 32
    convert_refused(gptq, tmp_path, x, "scales", "F16 [8, 80], not F16 or BF16 or F32 [15, 80]")
    set_quantization_config(gptq, group_size=32)
    set_quantization_config(gptq, dynamic={"-:.*mlp.*": {}})
    convert_refused(gptq, tmp_path, x, "dynamic")
    set_quantization_config(gptq, dynamic=None)
    torch = require("torch")
    scales = "model.layers.0.mlp.down_proj.scales"
    good = load_all(gptq.path)[scales]
    rewrite(gptq, scales, good[:4])
    convert_refused(gptq, tmp_path, x, scales, "F16 [4, 80], not F16 or BF16 or F32 [8, 80]")
    rewrite(gptq, scales, good)
    # A group index out of range: the core checks it before writing anything.
    g_idx = "model.layers.0.mlp.down_proj.g_idx"
    wrong = torch.arange(232, dtype=torch.int32) // 32
    wrong[7] = 8
    rewrite(gptq, g_idx, wrong)
    convert_refused(gptq, tmp_path, "model.layers.0.mlp.down_proj.weight", "input 7 in group 8")
    rewrite(gptq, g_idx, torch.arange(232, dtype=torch.int32) // 32)
    config = json.loads((gptq.path / "config.json").read_text())
    del config["quantization_config"]
    (gptq.path / "config.json").write_text(json.dumps(config))
    convert_refused(gptq, tmp_path, "no quantization_config")
    awq = ALL["awq"](tmp_path / "a")
    set_quantization_config(awq, version="gemv")
    convert_refused(awq, tmp_path, "model.layers.0.mlp.down_proj.qweight", "gemv")


def rewrite(model: QuantModel, name: str, value) -> None:
    """Replace tensor ``name`` in whichever shard holds it."""
    st = require("safetensors.torch")
    f = model.path / model.files[name]
    state = st.load_file(str(f))
    state[name] = value
    st.save_file(state, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("why", "state", "words"),
    [
        ("not JSON", b"{blocksize: 64", ["is not JSON"]),
        ("no blocksize", b'{"quant_type": "fp4", "shape": [72, 72]}', ["blocksize"]),
        ("another shape", b'{"quant_type": "fp4", "blocksize": 64, "shape": [72, 73]}',
         ["2592 bytes", "[72, 73]"]),
        ("another block size", b'{"quant_type": "fp4", "blocksize": 32, "shape": [72, 72]}',
         ["absmax", "[162]"]),
        ("another code", b'{"quant_type": "nf4", "blocksize": 64, "shape": [72, 72]}',
         ["quant_type 'nf4'"]),
    ],
)  # fmt: skip
def test_a_malformed_bnb_quant_state_is_refused(tmp_path, why, state, words):
    torch = require("torch")
    bnb = ALL["bnb-fp4"](tmp_path / "b")
    weight = "model.layers.0.self_attn.q_proj.weight"
    key = f"{weight}.quant_state.bitsandbytes__fp4"
    rewrite(bnb, key, torch.tensor(list(state), dtype=torch.uint8))
    convert_refused(bnb, tmp_path, weight, *words)


def test_a_double_quant_without_its_nested_tensors_is_refused(tmp_path):
    bnb = ALL["bnb-nf4-dq"](tmp_path / "b")
    weight = "model.layers.1.mlp.gate_proj.weight"
    st = require("safetensors.torch")
    f = bnb.path / bnb.files[f"{weight}.nested_absmax"]
    state = st.load_file(str(f))
    del state[f"{weight}.nested_absmax"]
    st.save_file(state, str(f), metadata={"format": "pt"})
    index = bnb.path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][f"{weight}.nested_absmax"]
    index.write_text(json.dumps(data))
    convert_refused(bnb, tmp_path, weight, "nested absmax", "missing")


def test_an_int8_weight_in_a_tiled_format_is_refused(tmp_path):
    torch = require("torch")
    bnb = ALL["bnb-int8"](tmp_path / "b")
    x = "model.layers.0.mlp.down_proj"
    rewrite(bnb, f"{x}.weight_format", torch.tensor(2, dtype=torch.uint8))
    convert_refused(bnb, tmp_path, f"{x}.weight", "weight_format is [2]")


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "gptq-v1-desc-act", "awq"])
def test_any_chunking_gives_the_same_bytes_and_loss_names_the_output(tmp_path, name):
    """Chunks of 64 KiB (max_memory 256 KiB on 2 threads) split the larger weights (bnb
    codes, GPTQ/AWQ whole output rows): the bytes are those of one chunk per tensor. The
    loss report and the journal name the output tensors (x.weight, not x.qweight)."""
    model = ALL[name](tmp_path / "src")
    one = fastcast.convert(model.path, "fp16", output=tmp_path / "one", dequantize=True)
    small = fastcast.convert(
        model.path, "fp16", output=tmp_path / "small", dequantize=True, threads=2,
        max_memory="256KiB",
    )  # fmt: skip
    assert load_all(tmp_path / "one").keys() == load_all(tmp_path / "small").keys()
    for f in sorted((tmp_path / "one").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "small" / f.name).read_bytes(), f.name
    losses = {t.name: t for t in small.loss}
    assert set(model.dequantized) <= set(losses)
    assert all(losses[w].dtype_from == "F32" for w in model.dequantized)
    assert [t.name for t in one.loss] == [t.name for t in small.loss]
    weight = sorted(model.dequantized)[0]
    assert losses[weight].elements == model.original[weight].numel()
    again = fastcast.convert(
        model.path, "fp16", output=tmp_path / "one", dequantize=True, resume=True
    )
    assert again.already_done


def test_a_plain_model_with_dequantize_changes_nothing_and_says_so(tmp_path):
    torch, st = require("torch"), require("safetensors.torch")
    folder = tmp_path / "plain"
    folder.mkdir()
    st.save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    report = fastcast.convert(folder, "bf16", output=tmp_path / "o", dequantize=True)
    assert any("--dequantize changed nothing" in w for w in report.warnings)
