"""``--dequantize`` of the 4-bit float formats, bit for bit against their producers'
own dequantizers: gpt-oss MXFP4 against transformers' ``convert_moe_packed_tensors``
(and the logits of its ``Mxfp4Config(dequantize=True)`` load), compressed-tensors MXFP4
and NVFP4 against compressed-tensors' decompressors, ModelOpt NVFP4 against
``NVFP4QTensor.dequantize``'s arithmetic (ModelOpt itself is not a dependency: its order,
``f32(code) * (f32(scale) * weight_scale_2)`` with +0 for code 8, written in torch).
E8M0 edge bytes follow PyTorch's ``float8_e8m0fnu``: 0 is 2^-127, 255 NaN."""

from __future__ import annotations

import json

import pytest

from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import Checkpoint, load_all
from quantized_fp4 import ALL_FP4, E2M1, gpt_oss_mxfp4

TARGETS = {"bf16": "bfloat16", "fp32": "float32"}


def bits(t):
    """A tensor's raw bits (NaNs compare by their pattern)."""
    torch = require("torch")
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def dequantize(model, out, target: str) -> dict:
    ok(cli("convert", model.path, "-o", out, "--dtype", target, "--dequantize"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (out / "hf_quant_config.json").exists()
    tensors = load_all(out)
    assert not [n for n in tensors if n.endswith(("_blocks", "_scales", "weight_scale"))]
    assert "OK" in ok(cli("verify", out))
    return tensors


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_gpt_oss_is_transformers_dequantization_bit_for_bit(tmp_path, target):
    torch = require("torch")
    mxfp4 = require("transformers.integrations.mxfp4")
    model = ALL_FP4["gpt-oss-mxfp4"](tmp_path / "src")
    got = dequantize(model, tmp_path / "out", target)
    src = Checkpoint(model.path)
    dtype = getattr(torch, TARGETS[target])
    for blocks in [n for n in model.state if n.endswith("_blocks")]:
        x = blocks.removesuffix("_blocks")
        want = mxfp4.convert_moe_packed_tensors(src[blocks], src[f"{x}_scales"], dtype=dtype)
        assert got[x].dtype == dtype and got[x].shape == want.shape, x
        assert torch.equal(bits(got[x]), bits(want)), x
    for name, t in model.plain.items():  # biases, attention, router: bf16 as they were
        assert torch.equal(bits(got[name]), bits(t.to(dtype))), name


def same_logits_as(theirs, out) -> None:
    """transformers loads ``out`` with no arguments, in bf16, and its logits are exactly
    those of ``theirs`` (the library's own dequantizing load of the source)."""
    torch = require("torch")
    transformers = require("transformers")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert ours.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_gpt_oss_loads_in_transformers_with_the_logits_of_its_own_dequantizing_load(tmp_path):
    torch = require("torch")
    transformers = require("transformers")
    model = gpt_oss_mxfp4(tmp_path / "src", edges=False)
    out = tmp_path / "out"
    ok(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        model.path, quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.bfloat16,
    )  # fmt: skip
    same_logits_as(theirs, out)


def test_e8m0_edge_bytes_are_pytorchs(tmp_path):
    """Byte 0 scales by 2^-127 (an fp32 subnormal, exact in bf16), 254 by 2^127 (codes
    of 2 and more overflow to inf), 255 is NaN whatever the code."""
    torch = require("torch")
    model = ALL_FP4["gpt-oss-mxfp4"](tmp_path / "src")
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    path = model.path / model.files[name]
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:header])[name]["data_offsets"][0]
    data[header + begin + 1] = 255  # expert 0, row 0, group 1 (of 2)
    path.write_bytes(bytes(data))
    got = dequantize(model, tmp_path / "out", "fp32")["model.layers.0.mlp.experts.gate_up_proj"]
    src = Checkpoint(model.path)
    blocks = src["model.layers.0.mlp.experts.gate_up_proj_blocks"][0]  # [rows, groups, 16]
    table = torch.tensor([*E2M1, *(-v for v in E2M1)])

    def codes(row: int, group: int):
        b = blocks[row, group].long()
        return table[torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)]

    column = got[0].t()  # [rows, in]
    assert torch.equal(column[0, 0:32], codes(0, 0) * 2.0**-127)  # byte 0
    assert torch.equal(column[1, 0:32], codes(1, 0) * 2.0**127)  # byte 254
    assert torch.isinf(column[1, 0:32][codes(1, 0).abs() >= 2]).all()
    assert torch.isnan(column[0, 32:64]).all()  # byte 255


@pytest.mark.parametrize("name", ["ct-mxfp4", "ct-nvfp4"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_compressed_tensors_fp4_is_its_decompressor_bit_for_bit(tmp_path, name, target):
    """compressed-tensors decompresses to bf16 (its order for NVFP4: ``f32(q) * (f32(s)
    / global)``, then one rounding): the bf16 output is its result; the fp32 one is the
    same products unrounded, so it rounds to its result."""
    torch = require("torch")
    require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = ALL_FP4[name](tmp_path / "src")
    got = dequantize(model, tmp_path / "out", target)
    src = Checkpoint(model.path)
    qc = model.quantization_config
    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    for packed in [n for n in model.state if n.endswith(".weight_packed")]:
        x = packed.removesuffix(".weight_packed")
        state = {k.removeprefix(f"{x}."): src[k] for k in src if k.startswith(f"{x}.weight")}
        want = compressor.decompress(state, scheme)["weight"]
        assert want.dtype == torch.bfloat16
        mine = got[f"{x}.weight"]
        assert mine.dtype == getattr(torch, TARGETS[target]), x
        assert torch.equal(bits(mine.to(torch.bfloat16)), bits(want)), x
    transformers = require("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no arguments


@pytest.mark.parametrize("form", ["modelopt-nvfp4-sidecar", "modelopt-nvfp4-config"])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_modelopt_nvfp4_is_its_dequantize_bit_for_bit(tmp_path, form, target):
    torch = require("torch")
    model = ALL_FP4[form](tmp_path / "src")
    got = dequantize(model, tmp_path / "out", target)
    src = Checkpoint(model.path)
    table = torch.tensor([*E2M1, 0.0, *(-v for v in E2M1[1:])])  # ModelOpt: code 8 is +0
    dtype = getattr(torch, TARGETS[target])
    for name in [n for n, role in model.state.items() if role == "quantized weight"]:
        x = name.removesuffix(".weight")
        packed = src[name]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        per_block = src[f"{x}.weight_scale"].float() * src[f"{x}.weight_scale_2"]
        want = (table[codes.long()] * per_block.repeat_interleave(16, dim=1)).to(dtype)
        assert torch.equal(bits(got[name]), bits(want)), name
        assert not (got[name].view(torch.int16 if target == "bf16" else torch.int32)
                    == {"bf16": -32768, "fp32": -(2**31)}[target]).any(), "no -0"  # fmt: skip
    transformers = require("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_weight_whose_scales_sit_in_another_shard(tmp_path):
    """ct-nvfp4 splits layer 0's down_proj from its scales; gpt-oss its down_proj blocks
    from their scales: each is read from the shard that holds it."""
    for name in ("ct-nvfp4", "gpt-oss-mxfp4"):
        model = ALL_FP4[name](tmp_path / name)
        assert len(set(model.files.values())) == 2
        dequantize(model, tmp_path / f"{name}-out", "bf16")


def rewrite(model, edit) -> None:
    """Apply ``edit`` to the state dict of each shard of ``model`` and write it back."""
    st = require("safetensors.torch")
    for f in sorted(model.path.glob("*.safetensors")):
        state = st.load_file(str(f))
        edit(state)
        st.save_file(state, str(f), metadata={"format": "pt"})
    index = model.path / "model.safetensors.index.json"
    if index.exists():  # the index follows the shards
        weight_map = {}
        for f in sorted(model.path.glob("*.safetensors")):
            weight_map.update(dict.fromkeys(st.load_file(str(f)), f.name))
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _global_0dim(state):
    for k in [k for k in state if k.endswith("weight_global_scale")]:
        state[k] = state[k].reshape(())


def _name_taken(state):
    torch = require("torch")
    if "model.layers.1.mlp.experts.down_proj_blocks" in state:
        state["model.layers.1.mlp.experts.down_proj"] = torch.zeros(2, dtype=torch.bfloat16)


def _short_scale(state):
    for k in [k for k in state if k.endswith("q_proj.weight_scale")]:
        state[k] = state[k][:, :-1].contiguous()


def _transposed_experts(state):
    k = "model.layers.0.mlp.up_proj.weight"
    state[k] = state[k].reshape(1, *state[k].shape)


@pytest.mark.parametrize(
    ("name", "edit", "words"),
    [
        ("ct-nvfp4", _global_0dim, "global scale"),
        ("gpt-oss-mxfp4", _name_taken, "its dequantized name, is taken"),
        ("modelopt-nvfp4-config", _short_scale, "scale"),
        ("modelopt-nvfp4-sidecar", _transposed_experts, "beside their x_weight_scale"),
    ],
)
def test_what_does_not_add_up_is_refused_naming_the_weight(tmp_path, name, edit, words):
    model = ALL_FP4[name](tmp_path / "src")
    rewrite(model, edit)
    before = snapshot(model.path)
    out = tmp_path / "out"
    line = refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"),
                   "does not reconstruct exactly", words, "nothing was written")  # fmt: skip
    assert ".safetensors: model." in line
    assert not out.exists() and snapshot(model.path) == before
