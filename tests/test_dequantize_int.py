"""``--dequantize`` of compressed-tensors' integer formats (``pack-quantized`` int4/int8,
symmetric and with packed zero points, the older ``weight_g_idx`` layout; ``int-quantized``
W8A8) against compressed-tensors' own decompressors and the exact product.

The rule (reference fp4-int4.md, section 8): ``(q - z) * s`` is exact in fp32 for 16-bit
scales, and fastcast rounds it once to the target. compressed-tensors computes in the
scale's dtype and then casts, so where the target is the scales' dtype the two agree bit
for bit, and elsewhere compressed-tensors rounds twice; those tests count where they part
and hold every difference to one ulp of the target."""

from __future__ import annotations

import json

import pytest
from test_dequantize_fp4 import bits, dequantize, rewrite, same_logits_as
from test_quantized import blanket_cast

from commands import cli, ok, refused
from conftest import require
from folders import snapshot
from quantized import Checkpoint
from quantized_fp4 import ALL_FP4, ct_int, ct_mixed

TARGETS = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
INT_MODELS = ["ct-w4a16", "ct-w4a16_asym", "ct-w8a16", "ct-w8a8"]


def decompressed(model, src: Checkpoint, x: str):
    """compressed-tensors' own decompressor's weight for module ``x`` (in the scale dtype)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc = model.quantization_config
    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme.model_validate(group)
    fmt = group.get("format") or qc["format"]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {k.removeprefix(f"{x}."): src[k] for k in src if k.startswith(f"{x}.weight")}
    return compressor.decompress(state, scheme)["weight"]


def exact(src: Checkpoint, x: str, bits_: int, group: int):
    """``(q - z) * s`` as an fp32 product (exact for 16-bit scales), written again from the
    format's definition with compressed-tensors' own unpacker."""
    torch = require("torch")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if f"{x}.weight_packed" in src:
        shape = torch.Size(src[f"{x}.weight_shape"].tolist())
        q = unpack_from_int32(src[f"{x}.weight_packed"], bits_, shape).int()
    else:
        q = src[f"{x}.weight"].int()
        shape = q.shape
    s = (
        src[f"{x}.weight_scale"]
        .float()
        .reshape(
            -1, 1 if src[f"{x}.weight_scale"].numel() == 1 else src[f"{x}.weight_scale"].shape[-1]
        )
    )
    s = s.expand(shape[0], s.shape[1])
    z = torch.zeros_like(s, dtype=torch.int32)
    if f"{x}.weight_zero_point" in src:
        stored = src[f"{x}.weight_zero_point"]
        z = (unpack_from_int32(stored, bits_, s.shape, packed_dim=0).int()
             if stored.dtype == torch.int32 else stored.int().expand(s.shape))  # fmt: skip
    g = (src[f"{x}.weight_g_idx"].long() if f"{x}.weight_g_idx" in src
         else torch.arange(shape[1]) // group)  # fmt: skip
    return s[:, g] * (q - z[:, g]).float()


def modules(model) -> list[str]:
    return [n.rsplit(".", 1)[0] for n, r in model.state.items() if r == "quantized weight"]


def weights_args(model) -> tuple[int, int]:
    w = next(iter(model.quantization_config["config_groups"].values()))["weights"]
    return w["num_bits"], w["group_size"] or 0


@pytest.mark.parametrize("name", INT_MODELS)
@pytest.mark.parametrize("target", ["bf16", "fp32"])
def test_compressed_tensors_integers_are_its_decompressor_bit_for_bit(tmp_path, name, target):
    """bf16 scales: compressed-tensors' bf16 result is the exact product rounded once, so
    the bf16 output is it, and the fp32 output is the exact product itself."""
    torch = require("torch")
    require("compressed_tensors")
    model = ALL_FP4[name](tmp_path / "src")
    got = dequantize(model, tmp_path / "out", target)
    src = Checkpoint(model.path)
    b, group = weights_args(model)
    for x in modules(model):
        want = decompressed(model, src, x)
        assert want.dtype == torch.bfloat16
        mine = got[f"{x}.weight"]
        assert mine.dtype == getattr(torch, TARGETS[target]) and mine.shape == want.shape, x
        assert torch.equal(bits(mine.to(torch.bfloat16)), bits(want)), x
        full = exact(src, x, b, group or want.shape[1])
        assert torch.equal(bits(mine), bits(full.to(mine.dtype))), x
    for name_, t in model.plain.items():  # embeddings, norms, the ignored lm_head
        assert torch.equal(bits(got[name_]), bits(t.to(getattr(torch, TARGETS[target])))), name_


VARIANTS = {
    "W8A8 naive, zero point per channel": ("W8A8", {"naive": {"symmetric": False}}),
    "W8A8 naive, one scale for the tensor": ("W8A8", {"naive": {"strategy": "tensor"}}),
    "W4A16_ASYM in fp32, F32 scales": ("W4A16_ASYM", {"dtype": "float32"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_layouts_are_the_decompressor_and_the_exact_product(tmp_path, variant):
    """I8 zero points (naive-quantized keeps them unpacked), a one-value scale, and F32
    scales (whose fp32 product rounds once, in compressed-tensors as here): bf16 outputs
    equal compressed-tensors' result rounded to bf16, fp32 ones the fp32 product."""
    torch = require("torch")
    require("compressed_tensors")
    preset, kwargs = VARIANTS[variant]
    model = ct_int(tmp_path / "src", preset, **kwargs)
    src = Checkpoint(model.path)
    b, group = weights_args(model)
    for target in ("bf16", "fp32"):
        got = dequantize(model, tmp_path / target, target)
        for x in modules(model):
            want = decompressed(model, src, x)
            mine = got[f"{x}.weight"]
            assert torch.equal(bits(mine.to(torch.bfloat16)), bits(want.to(torch.bfloat16))), x
            full = exact(src, x, b, group or want.shape[1])
            assert torch.equal(bits(mine), bits(full.to(mine.dtype))), (x, target)


@pytest.mark.parametrize("target", ["bf16", "fp32"])
def test_the_older_g_idx_layout_groups_inputs_by_their_index(tmp_path, target):
    """``actorder: group``: input ``i`` takes the scale of group ``weight_g_idx[i]``
    (compressed-tensors 0.20 no longer reads it; the exact product is the reference)."""
    torch = require("torch")
    model = ALL_FP4["ct-w4a16-gidx"](tmp_path / "src")
    got = dequantize(model, tmp_path / "out", target)
    src = Checkpoint(model.path)
    for x in modules(model):
        g_idx = src[f"{x}.weight_g_idx"]
        assert not torch.equal(g_idx, torch.arange(len(g_idx), dtype=g_idx.dtype) // 32)
        full = exact(src, x, 4, 32)
        assert torch.equal(bits(got[f"{x}.weight"]), bits(full.to(got[f"{x}.weight"].dtype)))
        by_position = exact({k: src[k] for k in src if "g_idx" not in k}, x, 4, 32)
        assert not torch.equal(full, by_position), "the index must matter in this fixture"


@pytest.mark.parametrize("preset", ["W4A16", "W8A8"])
def test_fp16_scales_round_once_where_compressed_tensors_rounds_twice(tmp_path, preset):
    """An fp16 model to bf16: fastcast rounds the exact product once; compressed-tensors
    rounds it to fp16, then to bf16. To fp16 they agree bit for bit."""
    torch = require("torch")
    require("compressed_tensors")
    model = ct_int(tmp_path / "src", preset, dtype="float16")
    src = Checkpoint(model.path)
    b, group = weights_args(model)
    got = dequantize(model, tmp_path / "bf16", "bf16")
    same = dequantize(model, tmp_path / "fp16", "fp16")
    differ = total = 0
    for x in modules(model):
        want = decompressed(model, src, x)
        assert want.dtype == torch.float16
        assert torch.equal(bits(same[f"{x}.weight"]), bits(want)), x
        full = exact(src, x, b, group or want.shape[1])
        mine = got[f"{x}.weight"]
        assert torch.equal(bits(mine), bits(full.to(torch.bfloat16))), x
        twice = want.to(torch.bfloat16)
        ulps = (bits(mine).int() - bits(twice).int()).abs()
        assert int(ulps.max()) <= 1, x
        differ, total = differ + int((ulps > 0).sum()), total + mine.numel()
    print(f"{preset} fp16 scales -> bf16: {differ} of {total} weights differ from "
          "compressed-tensors' double rounding, each by 1 ulp")  # fmt: skip


def test_mixed_precision_dequantizes_each_group_in_its_format(tmp_path):
    """NVFP4A16 MLPs and W4A16 int4 attention in one model: each weight in its own
    group's format, both against compressed-tensors' decompressors."""
    torch = require("torch")
    require("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model = ct_mixed(tmp_path / "src")
    got = dequantize(model, tmp_path / "out", "bf16")
    src = Checkpoint(model.path)
    groups = model.quantization_config["config_groups"]
    for x in modules(model):
        group = next(g for g in groups.values()
                     if any(x.find(t.split(".*")[1]) >= 0 for t in g["targets"]))  # fmt: skip
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        state = {k.removeprefix(f"{x}."): src[k] for k in src if k.startswith(f"{x}.weight")}
        want = compressor.decompress(state, QuantizationScheme.model_validate(group))["weight"]
        assert torch.equal(bits(got[f"{x}.weight"]), bits(want.to(torch.bfloat16))), x
    transformers = require("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("name", ["ct-w4a16_asym", "ct-w8a8"])
def test_transformers_loads_the_output_with_the_logits_of_its_own_decompressing_load(
    tmp_path, name
):
    """transformers' compressed-tensors integration decompresses on load
    (``run_compressed=False``) into the scales' dtype: bf16 here, as fastcast's output."""
    torch = require("torch")
    transformers = require("transformers")
    require("compressed_tensors")
    model = ALL_FP4[name](tmp_path / "src")
    out = tmp_path / "out"
    ok(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        model.path, dtype=torch.bfloat16,
        quantization_config=transformers.CompressedTensorsConfig(run_compressed=False),
    )  # fmt: skip
    same_logits_as(theirs, out)


def test_verify_fails_an_output_whose_dequantized_weight_changed(tmp_path):
    """verify recomputes each dequantized weight from the source: one flipped bit fails."""
    model = ALL_FP4["ct-w4a16_asym"](tmp_path / "src")
    out = tmp_path / "out"
    dequantize(model, out, "bf16")
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:header])[name]["data_offsets"][0]
    data[header + begin + 1] ^= 0x01
    shard.write_bytes(bytes(data))
    r = cli("verify", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"mismatch: {name} (model.safetensors): 1 of 16384 elements differ" in r.stdout


def test_verify_fails_a_blanket_cast_of_fp16_scales(tmp_path):
    """A blanket bf16 cast of an fp16 W4A16 model rounds its scales: verify names it."""
    model = ct_int(tmp_path / "src", "W4A16", dtype="float16")
    out = tmp_path / "blanket"
    assert blanket_cast(model, out)
    r = cli("verify", out, "--against", model.path, "--dtype", "bf16")
    assert r.returncode == 1 and "a blanket cast" in r.stdout, r.stdout + r.stderr


def _config_bits(bits_: int):
    def edit(config):
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = bits_

    return edit


def _config_symmetric(config):
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True


def _shape_rows(state):
    torch = require("torch")
    k = "model.layers.0.self_attn.q_proj.weight_shape"
    if k in state:
        state[k] = torch.tensor([7, 128])


def _g_idx_past_the_groups(state):
    k = "model.layers.1.mlp.up_proj.weight_g_idx"
    if k in state:
        state[k] = state[k].clone()
        state[k][5] = 99


def _name_taken(state):
    torch = require("torch")
    if "model.layers.0.self_attn.k_proj.weight_packed" in state:
        state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(2, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("name", "config_edit", "edit", "words"),
    [
        ("ct-w4a16", _config_bits(8), None, "no integer config group"),
        ("ct-w4a16_asym", _config_symmetric, None, "no integer config group"),
        ("ct-w4a16", None, _shape_rows, "does not fit its 128 packed rows"),
        ("ct-w4a16-gidx", None, _g_idx_past_the_groups, "in group 99"),
        ("ct-w4a16", None, _name_taken, "its dequantized name, is taken"),
    ],
)
def test_what_does_not_add_up_is_refused_naming_the_weight(
    tmp_path, name, config_edit, edit, words
):
    model = ALL_FP4[name](tmp_path / "src")
    if config_edit is not None:
        config = model.config
        config_edit(config)
        (model.path / "config.json").write_text(json.dumps(config))
    if edit is not None:
        rewrite(model, edit)
    before = snapshot(model.path)
    out = tmp_path / "out"
    line = refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"),
                   words)  # fmt: skip
    assert "model.layers." in line and "Traceback" not in line
    assert not out.exists() and snapshot(model.path) == before


def test_three_bit_packing_is_refused_for_its_two_layouts(tmp_path):
    """3-bit codes straddle words, packed padded before compressed-tensors PR #732 and
    densely after, under one format name: refused by name rather than guessed."""
    torch = require("torch")
    require("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    model = ALL_FP4["ct-w4a16"](tmp_path / "src")

    def three_bits(state):
        for k in [k for k in state if k.endswith(".weight_packed")]:
            rows, cols = state[k.replace("_packed", "_shape")].tolist()
            state[k] = pack_to_int32(torch.zeros(rows, cols, dtype=torch.int8), 3)

    rewrite(model, three_bits)
    config = model.config
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (model.path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(cli("convert", model.path, "-o", out, "--dtype", "bf16", "--dequantize"),
            "3-bit pack-quantized", "1, 2, 4 and 8 bits")  # fmt: skip
    assert not out.exists()
