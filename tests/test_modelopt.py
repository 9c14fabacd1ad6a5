"""ModelOpt NVFP4 checkpoints made by ModelOpt itself (``mtq.quantize`` with
``NVFP4_DEFAULT_CFG`` and ``export_hf_checkpoint``, on the CPU), dequantized by fastcast
and compared bit for bit with ModelOpt's own ``NVFP4QTensor.dequantize``: a dense Llama
(U8 ``x.weight``, F8_E4M3 ``x.weight_scale``, 0-dim F32 ``x.weight_scale_2``) and gpt-oss,
whose fused experts ModelOpt exports transposed back to transformers' ``x @ W`` layout
(``experts.gate_up_proj`` U8 ``[E, in / 2, out]``, ``gate_up_proj_weight_scale``
``[E, in / 16, out]``, one ``gate_up_proj_weight_scale_2`` for every expert).

tests/quantized_fp4.py writes ModelOpt's tensors by the reference's rules; these are the
library's own files, which also confirm the fused experts' layout the reference left
unconfirmed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_dequantize_fp4 import bits
from test_quantized import assert_kept

from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import QuantModel

TARGETS = {"bf16": "bfloat16", "fp32": "float32"}


def modelopt_model(tmp: Path, arch: str, algo: str = "NVFP4") -> Path:
    """A tiny ``arch`` (``llama`` or ``gpt_oss``) quantized to ``algo`` (NVFP4, or FP8:
    an e4m3 weight with one F32 scale) and exported by ModelOpt, random weights in bf16,
    calibrated on random tokens."""
    torch = require("torch")
    transformers = require("transformers")
    mtq = require("modelopt.torch.quantization")
    export = require("modelopt.torch.export")
    common: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
    if arch == "llama":
        config = transformers.LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    else:
        config = transformers.GptOssConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
            architectures=["GptOssForCausalLM"],
        )  # fmt: skip
    torch.manual_seed({"llama": 61, "gpt_oss": 62}[arch])
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # outliers, so that block scales differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, getattr(mtq, f"{algo}_DEFAULT_CFG"), lambda m: m(calibration))
    root = tmp / f"{arch}-modelopt-{algo.lower()}"
    export.export_hf_checkpoint(model, export_dir=str(root))
    return root


def theirs(src: dict[str, Any], name: str, dtype: Any) -> Any:
    """ModelOpt's own dequantization of quantized weight ``name``: a Linear's
    ``NVFP4QTensor`` as exported; fused experts turned back to the ``[E, out, in / 2]``
    layout ModelOpt quantized them in, dequantized, and transposed again."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    packed = src[name]
    if packed.dim() == 2:
        x = name.removesuffix(".weight")
        scale, double = src[f"{x}.weight_scale"], src[f"{x}.weight_scale_2"]
        shape = (packed.shape[0], 2 * packed.shape[1])
        q = NVFP4QTensor(shape, dtype, packed)
        return q.dequantize(dtype=dtype, scale=scale, double_scale=double, block_sizes={-1: 16})
    experts, half, out = packed.shape
    q = NVFP4QTensor((experts, out, 2 * half), dtype, packed.transpose(1, 2).contiguous())
    scale = src[f"{name}_weight_scale"].transpose(1, 2).contiguous()
    double = src[f"{name}_weight_scale_2"]
    return q.dequantize(
        dtype=dtype, scale=scale, double_scale=double, block_sizes={-1: 16}
    ).transpose(1, 2)


def quantized_names(src: dict[str, Any]) -> list[str]:
    """The U8 codes: ``x.weight`` of Linears, ``experts.*_proj`` fused."""
    torch = require("torch")
    return [n for n, t in src.items() if t.dtype == torch.uint8]


@pytest.fixture(scope="module", params=["llama", "gpt_oss"])
def exported(request, tmp_path_factory) -> Path:
    return modelopt_model(tmp_path_factory.mktemp("modelopt"), request.param)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_dequantize_is_modelopts_own_bit_for_bit(exported, tmp_path, target):
    torch = require("torch")
    st = require("safetensors.torch")
    before = snapshot(exported)
    out = tmp_path / "out"
    ok(cli("convert", exported, "-o", out, "--dtype", target, "--dequantize"))
    assert snapshot(exported) == before
    src = st.load_file(str(exported / "model.safetensors"))
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(st.load_file(str(f)))
    dtype = getattr(torch, TARGETS[target])
    names = quantized_names(src)
    assert any(src[n].dim() == 3 for n in names) == ("gpt_oss" in exported.name)
    for name in names:
        want = theirs(src, name, dtype)
        assert got[name].dtype == dtype and got[name].shape == want.shape, name
        assert torch.equal(bits(got[name]), bits(want.contiguous())), name
    assert not [n for n in got if "scale" in n], "no quantization state is left"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and not (out / "hf_quant_config.json").exists()
    assert "OK" in ok(cli("verify", out))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    return modelopt_model(tmp_path_factory.mktemp("modelopt-gpt-oss"), "gpt_oss")


def test_gpt_oss_output_loads_in_transformers_with_modelopts_expert_values(gpt_oss, tmp_path):
    """transformers loads the dequantized gpt-oss with no arguments, each fused expert
    parameter holding ModelOpt's dequantized values in its own ``[E, in, out]``."""
    exported = gpt_oss
    torch = require("torch")
    transformers = require("transformers")
    st = require("safetensors.torch")
    out = tmp_path / "out"
    ok(cli("convert", exported, "-o", out, "--dtype", "bf16", "--dequantize"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    src = st.load_file(str(exported / "model.safetensors"))
    params = dict(model.named_parameters())
    for name in [n for n in quantized_names(src) if src[n].dim() == 3]:
        assert torch.equal(bits(params[name].data), bits(theirs(src, name, torch.bfloat16)))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 22, 7, 3]])).logits
    assert torch.isfinite(logits).all()


def test_keep_quantized_keeps_modelopts_state_and_a_plain_cast_is_refused(exported, tmp_path):
    """The fused experts' scales, named after their tensor (``x_weight_scale``), are
    quantization state like a Linear's: kept byte for byte, never cast."""
    before = snapshot(exported)
    refused(cli("convert", exported, "-o", tmp_path / "cast", "--dtype", "fp16"),
            "modelopt", "--keep-quantized", "or --dequantize")  # fmt: skip
    out = tmp_path / "kept"
    ok(cli("convert", exported, "-o", out, "--dtype", "fp16", "--keep-quantized"))
    torch, st = require("torch"), require("safetensors.torch")
    src = st.load_file(str(exported / "model.safetensors"))
    codes = {n for n, t in src.items() if t.dtype == torch.uint8}
    scales = {n for n, t in src.items()
              if t.dtype == torch.float8_e4m3fn or n.endswith(("_scale", "_scale_2"))}  # fmt: skip
    state = {**dict.fromkeys(codes, "quantized weight"), **dict.fromkeys(scales, "scale")}
    assert any(n.endswith("_proj_weight_scale") for n in scales) == ("gpt_oss" in exported.name)
    model = QuantModel("modelopt", exported, "modelopt", "NVFP4", "bfloat16", state=state)
    model.files = dict.fromkeys(src, "model.safetensors")
    model.plain = {n: t for n, t in src.items() if n not in state}
    assert_kept(model, out, "fp16")
    assert (out / "hf_quant_config.json").read_bytes() == (
        exported / "hf_quant_config.json"
    ).read_bytes()
    assert snapshot(exported) == before
    assert "OK" in ok(cli("verify", out))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fp8_is_modelopts_fp32_product_rounded_once(tmp_path, target):
    """ModelOpt FP8 (NVIDIA's ``*-FP8`` exports): ``FP8QTensor.dequantize`` multiplies
    in the target dtype, rounding the F32 scale to bf16 first; fastcast computes
    ``f32(q) * f32(scale)`` and rounds once, as every fp8 format here. In fp32 the two are
    the same bits; in bf16 fastcast's is ModelOpt's fp32 result rounded once."""
    torch = require("torch")
    st = require("safetensors.torch")
    from modelopt.torch.quantization.qtensor import FP8QTensor

    exported = modelopt_model(tmp_path, "llama", "FP8")
    out = tmp_path / "out"
    ok(cli("convert", exported, "-o", out, "--dtype", target, "--dequantize"))
    src = st.load_file(str(exported / "model.safetensors"))
    got = st.load_file(str(next(out.glob("*.safetensors"))))
    dtype = getattr(torch, TARGETS[target])
    names = [n for n, t in src.items() if t.dtype == torch.float8_e4m3fn]
    assert names
    differ = total = 0
    for name in names:
        q, scale = src[name], src[name.removesuffix("weight") + "weight_scale"]
        fp32 = FP8QTensor(q.shape, torch.float32, q).dequantize(torch.float32, scale=scale)
        assert torch.equal(bits(got[name]), bits(fp32.to(dtype))), name
        theirs_in_target = FP8QTensor(q.shape, dtype, q).dequantize(dtype, scale=scale)
        differ += int((bits(got[name]) != bits(theirs_in_target)).sum())
        total += q.numel()
    assert target == "bf16" or differ == 0
    print(f"ModelOpt FP8 -> {target}: {differ} of {total} weights differ from "
          "FP8QTensor.dequantize in the target dtype")  # fmt: skip
    assert "OK" in ok(cli("verify", out))
    kept = tmp_path / "kept"
    ok(cli("convert", exported, "-o", kept, "--dtype", "fp16", "--keep-quantized"))
    assert "OK" in ok(cli("verify", kept))
