"""The 4-bit checkpoints people ship now (gpt-oss MXFP4, compressed-tensors MXFP4, NVFP4
and mixed-precision, ModelOpt NVFP4 declared in config.json or only in its sidecar,
DeepSeek-V4-style fp8 with E8M0 scales; see quantized_fp4.py) are never corrupted: a plain
cast is refused naming the format, ``--keep-quantized`` keeps every quantization tensor,
the quantization config and the sidecar byte for byte, ``--dequantize`` is offered where
it works (test_dequantize_fp4.py) and refused with what it does not do yet elsewhere,
inspect names the format and what each option would do, and verify passes what fastcast
wrote and fails a blanket cast of float state."""

from __future__ import annotations

import json

import pytest
from test_quantized import assert_kept, blanket_cast, raw_tensors

import fastcast
from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import QuantModel
from quantized_fp4 import ALL_FP4, gpt_oss_original, modelopt_nvfp4

#: gpt-oss's kernels need bf16 (NEEDS_DTYPE); the others are bf16 models cast to fp16,
#: so that their plain tensors really change.
KEEP_TARGET = {"gpt-oss-mxfp4": "bf16"}
#: What --dequantize does not reconstruct yet: DeepSeek-V4's unconfirmed layout.
NOT_DEQUANTIZED = {"deepseek-v4": "DeepSeek-V4-style fp8"}


@pytest.fixture(params=sorted(ALL_FP4))
def model(request, tmp_path) -> QuantModel:
    return ALL_FP4[request.param](tmp_path / "src")


def test_a_plain_cast_is_refused_naming_the_format(model, tmp_path):
    before = snapshot(model.path)
    out = tmp_path / "out"
    line = refused(cli("convert", model.path, "-o", out, "--dtype", "bf16"), "--keep-quantized")
    assert "would corrupt it" in line
    assert (model.method or "modelopt") in line
    offered = "or --dequantize" in line
    assert offered == (model.name not in NOT_DEQUANTIZED), "only a way out that works"
    assert not out.exists() and snapshot(model.path) == before


def test_keep_quantized_keeps_every_state_tensor_and_the_sidecar(model, tmp_path):
    out = tmp_path / "out"
    target = KEEP_TARGET.get(model.name, "fp16")
    ok(cli("convert", model.path, "-o", out, "--dtype", target, "--keep-quantized"))
    want = assert_kept(model, out, target)
    source_config = json.loads((model.path / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config.get("quantization_config") == source_config.get("quantization_config")
    assert config["torch_dtype"] == str(want).removeprefix("torch.")
    sidecar = model.path / "hf_quant_config.json"
    if sidecar.exists():
        assert (out / sidecar.name).read_bytes() == sidecar.read_bytes()
    record = json.loads((out / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "keep"
    assert "OK" in ok(cli("verify", out))


@pytest.mark.parametrize("name", sorted(NOT_DEQUANTIZED))
def test_dequantize_is_refused_saying_what_it_does_not_do_yet(name, tmp_path):
    model = ALL_FP4[name](tmp_path / "src")
    before = snapshot(model.path)
    out = tmp_path / "out"
    refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"),
            f"--dequantize does not reconstruct {NOT_DEQUANTIZED[name]}",
            "--keep-quantized keeps it")  # fmt: skip
    assert not out.exists() and snapshot(model.path) == before


def test_inspect_names_the_format_and_what_each_option_does(model):
    stdout = ok(cli("inspect", model.path, "--dtype", "fp16"))
    assert f"quantized: {model.method or 'modelopt'} (" in stdout
    assert "config.json says" not in stdout, "a quantized model's weights are not its dtype"
    assert "with --keep-quantized it casts only" in stdout
    assert ("with --dequantize" in stdout) == (model.name not in NOT_DEQUANTIZED)
    roles = {r.role for r in fastcast.inspect(model.path).roles}
    assert set(model.state.values()) <= roles


def test_verify_fails_a_blanket_cast_of_float_state(model, tmp_path):
    """What a blanket cast writes (every float tensor cast, scales included) fails verify
    wherever it changed a state tensor; where every state tensor is an integer (MXFP4's
    U8 codes and E8M0 bytes) or bf16 already (compressed-tensors' integers' scales in a
    bf16 model), a cast of the floats changed nothing quantized, and verify says so by
    passing (test_dequantize_int.py fails it on a changed weight)."""
    out = tmp_path / "blanket"
    state_is_float = blanket_cast(model, out)
    r = cli("verify", out, "--against", model.path, "--dtype", "bf16")
    if state_is_float:
        assert r.returncode == 1 and "a blanket cast" in r.stdout, r.stdout + r.stderr
    else:
        assert r.returncode == 0, r.stdout + r.stderr


def test_detected_without_its_config(model, tmp_path):
    """A checkpoint whose config.json lost its quantization_config (and its sidecar) is
    still recognised by its tensors, and --keep-quantized still keeps it."""
    config = json.loads((model.path / "config.json").read_text())
    config.pop("quantization_config", None)
    (model.path / "config.json").write_text(json.dumps(config))
    (model.path / "hf_quant_config.json").unlink(missing_ok=True)
    line = refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16"))
    assert "tensor names" in line
    target = KEEP_TARGET.get(model.name, "fp16")
    ok(cli("convert", model.path, "-o", tmp_path / "k", "--dtype", target, "--keep-quantized"))
    src, dst = raw_tensors(model.path), raw_tensors(tmp_path / "k")
    assert all(dst[n] == src[n] for n in model.state)


def test_a_modelopt_sidecar_alone_declares_it(tmp_path):
    """The corruption the issue found: ModelOpt's NVFP4 declared only in
    hf_quant_config.json. Its F32 0-dim weight_scale_2 is a scale (kept), the model is
    named as ModelOpt's, from the sidecar."""
    model = ALL_FP4["modelopt-nvfp4-sidecar"](tmp_path / "src")
    assert "quantization_config" not in model.config
    line = refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16"))
    assert "modelopt (NVFP4, group 16; from hf_quant_config.json)" in line
    info = fastcast.inspect(model.path)
    assert info.quantization is not None and info.quantization.startswith("modelopt (NVFP4")


@pytest.mark.parametrize("mode", [[], ["--keep-quantized"], ["--dequantize"]])
def test_gpt_oss_original_layout_is_refused_by_name_in_every_mode(tmp_path, mode):
    model = gpt_oss_original(tmp_path / "src")
    before = snapshot(model.path)
    out = tmp_path / "out"
    refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", *mode),
            "gpt-oss's own original/ layout", "transformers layout")  # fmt: skip
    assert not out.exists() and snapshot(model.path) == before


@pytest.mark.parametrize("mode", [[], ["--keep-quantized"], ["--dequantize"]])
def test_a_modelopt_algorithm_fastcast_does_not_know_is_refused_by_name(tmp_path, mode):
    model = modelopt_nvfp4(tmp_path / "src", "config", "NVFP4_SVD")
    out = tmp_path / "out"
    refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", *mode),
            "ModelOpt algorithm NVFP4_SVD", "converts nothing")  # fmt: skip
    assert not out.exists()


def test_modelopt_awq_is_kept_and_its_dequantize_refused_by_name(tmp_path):
    model = modelopt_nvfp4(tmp_path / "src", "sidecar", "NVFP4_AWQ")
    out = tmp_path / "out"
    ok(cli("convert", model.path, "-o", out, "--dtype", "fp16", "--keep-quantized"))
    src, dst = raw_tensors(model.path), raw_tensors(out)
    smoothing = [n for n in model.state if n.endswith(".pre_quant_scale")]
    assert smoothing and all(dst[n] == src[n] for n in smoothing)
    refused(cli("convert", model.path, "-o", tmp_path / "d", "--dtype", "bf16", "--dequantize"),
            "NVFP4_AWQ", "pre_quant_scale")  # fmt: skip


def test_mixed_precision_with_a_format_fastcast_does_not_know_is_not_kept(tmp_path):
    model = ALL_FP4["ct-mixed"](tmp_path / "src")
    config = json.loads((model.path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_1"]["format"] = "marlin-24"
    (model.path / "config.json").write_text(json.dumps(config))
    refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16",
                "--keep-quantized"), "does not know")  # fmt: skip


@pytest.mark.parametrize(
    ("content", "error"),
    [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object"), ('{"quantization": 7}', "")],
)
def test_a_broken_sidecar_is_one_line_or_ignored(tmp_path, content, error):
    """A sidecar that is not a JSON object is an error naming it; one with no
    quantization dict declares nothing, and the tensors still tell the model is
    quantized."""
    model = ALL_FP4["modelopt-nvfp4-sidecar"](tmp_path / "src")
    (model.path / "hf_quant_config.json").write_text(content)
    r = cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "bf16")
    line = refused(r)
    if error:
        assert "hf_quant_config.json: " + error in line
    else:
        assert "tensor names" in line


def test_mxfp4_kept_in_fp16_is_refused_for_its_kernels(tmp_path):
    model = ALL_FP4["gpt-oss-mxfp4"](tmp_path / "src")
    refused(cli("convert", model.path, "-o", tmp_path / "o", "--dtype", "fp16",
                "--keep-quantized"), "keeps it bf16", "kernels")  # fmt: skip


def test_a_sidecar_away_from_the_weights_declares_nothing(tmp_path):
    """ModelOpt's hf_quant_config.json in a folder holding no weights (another model's
    files kept beside, say) is not this model's quantization: a plain model with one
    converts, and the file is copied as it is."""
    torch, st = require("torch"), require("safetensors.torch")
    model = tmp_path / "plain"
    (model / "extras").mkdir(parents=True)
    st.save_file({"w": torch.ones(4, 4)}, str(model / "model.safetensors"))
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "float32"})
    )
    sidecar = model / "extras" / "hf_quant_config.json"
    sidecar.write_text(json.dumps({"quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    ok(cli("convert", model, "-o", tmp_path / "out", "--dtype", "bf16"))
    assert (
        tmp_path / "out" / "extras" / "hf_quant_config.json"
    ).read_bytes() == sidecar.read_bytes()
