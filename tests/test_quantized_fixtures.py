"""The quantized fixtures (quantized.py) checked against the formats' own definitions and,
where they run on the CPU, the libraries that read them.

Every fixture: a model folder (config with the producer's ``quantization_config``,
safetensors that load, an index that names each tensor's shard), every quantization tensor
with the dtype, shape and role of Table A, plain tensors in the model's dtype, the oracle
equal to the reference read back from the folder and close to the weights it was made from
(within the format's precision). Then the oracle against the libraries, bit for bit:
bitsandbytes' ``dequantize_4bit`` and ``int8_vectorwise_dequant``, compressed-tensors'
``FP8BlockDequantizer``, ``FloatQuantizationCompressor.decompress`` and ``AutoAWQConverter``,
AutoGPTQ's torch dequantization (transcribed: no GPTQ package runs here), and transformers
``from_pretrained`` for the formats it loads on the CPU (bitsandbytes and the fine-grained fp8
path need accelerate; without it those tests skip).
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import require
from quantized import (
    ALL,
    AWQ_REVERSE_ORDER,
    E4M3_MAX,
    FBGEMM_MIN_SCALE,
    ROLES,
    Checkpoint,
    QuantModel,
    dequantize_bnb_4bit,
    reference_dequantize,
    with_path,
)

DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each fixture built once for the module, on first use."""
    cache: dict[str, QuantModel] = {}

    def get(name: str) -> QuantModel:
        if name not in cache:
            cache[name] = ALL[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(params=sorted(ALL))
def model(request, built) -> QuantModel:
    return built(request.param)


@pytest.fixture(scope="module")
def torch():
    return require("torch")


# --- the folder ---------------------------------------------------------------------------


def test_folder_is_a_model_repository(model):
    st = require("safetensors.torch")
    root = model.path
    config = json.loads((root / "config.json").read_text())
    assert config["architectures"] and config["model_type"]
    assert config["torch_dtype"] == model.dtype
    assert config["quantization_config"]["quant_method"] == model.method
    assert json.loads((root / "generation_config.json").read_text())["eos_token_id"] is not None

    on_disk, total = {}, 0
    for f in sorted(root.glob("*.safetensors")):
        tensors = st.load_file(f)
        on_disk.update(dict.fromkeys(tensors, f.name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = root / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        assert data["weight_map"] == on_disk
        assert data["metadata"]["total_size"] == total
        assert len(set(on_disk.values())) == 2
    else:
        assert set(on_disk.values()) == {"model.safetensors"}
    assert model.files == on_disk
    assert set(model.state) | set(model.plain) == set(on_disk)
    assert not set(model.state) & set(model.plain)
    assert set(model.state.values()) <= set(ROLES)
    assert model.dequantized.keys() == model.original.keys() and model.dequantized


@pytest.mark.parametrize(
    ("name", "weight", "scale"),
    [
        ("deepseek-fp8", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "weight_scale_inv"),
        ("bnb-nf4-dq", "model.layers.0.self_attn.q_proj.weight", "weight.absmax"),
        ("gptq-v1-desc-act", "model.layers.0.self_attn.q_proj.qweight", "qzeros"),
    ],
)
def test_a_weight_and_its_scale_sit_in_different_shards(built, name, weight, scale):
    m = built(name)
    x = weight.rsplit(".", 1)[0]
    assert m.files[weight] != m.files[f"{x}.{scale}"]
    assert reference_dequantize(m, f"{x}.weight").shape == m.original[f"{x}.weight"].shape


def expected_state(m: QuantModel) -> dict[str, tuple[str, tuple[int, ...] | None, str]]:
    """Table A of the reference, independent of the builders: name -> (dtype, shape, role)."""
    qc = m.quantization_config
    out: dict[str, tuple[str, tuple[int, ...] | None, str]] = {}
    for name, w in m.original.items():
        x = name.removesuffix(".weight")
        o, i = w.shape
        if m.name == "deepseek-fp8":
            out[name] = ("F8_E4M3", (o, i), "quantized weight")
            out[f"{x}.weight_scale_inv"] = ("F32", (-(-o // 128), -(-i // 128)), "scale")
        elif m.name.startswith("ct-fp8"):
            per = (1,) if m.name.endswith("tensor") else (o, 1)
            out[name] = ("F8_E4M3", (o, i), "quantized weight")
            out[f"{x}.weight_scale"] = ("BF16", per, "scale")
            if m.name.endswith("tensor"):
                out[f"{x}.input_scale"] = ("BF16", (1,), "scale")
        elif m.name == "fbgemm-fp8":
            out[name] = ("F8_E4M3", (o, i), "quantized weight")
            out[f"{x}.weight_scale"] = ("F32", (o, 1), "scale")
        elif m.name == "vllm-fp8-static":
            out[name] = ("F8_E4M3", (o, i), "quantized weight")
            out[f"{x}.weight_scale"] = ("F32", (), "scale")
            out[f"{x}.input_scale"] = ("F32", (), "scale")
        elif m.name == "bnb-int8":
            out[name] = ("I8", (o, i), "quantized weight")
            out[f"{x}.SCB"] = ("F32", (o,), "scale")
            out[f"{x}.weight_format"] = ("U8", (), "quant state")
        elif m.method == "bitsandbytes":
            storage = qc["bnb_4bit_quant_storage"]
            itemsize = {"uint8": 1, "bfloat16": 2}[storage]
            n, dq = o * i, qc["bnb_4bit_use_double_quant"]
            blocks = -(-n // 64)
            out[name] = (
                {"uint8": "U8", "bfloat16": "BF16"}[storage],
                ((n + 1) // (2 * itemsize), 1),
                "quantized weight",
            )
            out[f"{name}.absmax"] = ("U8" if dq else "F32", (blocks,), "scale")
            out[f"{name}.quant_map"] = ("F32", (16,), "quant state")
            out[f"{name}.quant_state.bitsandbytes__{qc['bnb_4bit_quant_type']}"] = (
                "U8",
                None,
                "quant state",
            )
            if dq:
                out[f"{name}.nested_absmax"] = ("F32", (-(-blocks // 256),), "scale")
                out[f"{name}.nested_quant_map"] = ("F32", (256,), "quant state")
        elif m.method == "gptq":
            g = qc["group_size"]
            out[f"{x}.qweight"] = ("I32", (i * 4 // 32, o), "quantized weight")
            out[f"{x}.qzeros"] = ("I32", (-(-i // g), o * 4 // 32), "zero point")
            out[f"{x}.scales"] = ("F16", (-(-i // g), o), "scale")
            out[f"{x}.g_idx"] = ("I32", (i,), "group index")
        elif m.method == "awq":
            g = qc["group_size"]
            out[f"{x}.qweight"] = ("I32", (i, o // 8), "quantized weight")
            out[f"{x}.qzeros"] = ("I32", (i // g, o // 8), "zero point")
            out[f"{x}.scales"] = ("F16", (i // g, o), "scale")
    if m.name == "deepseek-fp8":
        experts = m.config["n_routed_experts"]
        out["model.layers.1.mlp.gate.e_score_correction_bias"] = ("F32", (experts,), "pinned fp32")
    return out


def test_state_has_the_dtypes_shapes_and_roles_of_table_a(model):
    ckpt = Checkpoint(model.path)
    expected = expected_state(model)
    assert set(model.state) == set(expected)
    for name, (dtype, shape, role) in expected.items():
        assert ckpt.dtype(name) == dtype, name
        if shape is not None:
            assert tuple(ckpt.shape(name)) == shape, name
        assert model.state[name] == role, name


def test_plain_tensors_are_in_the_model_dtype(model, torch):
    ckpt = Checkpoint(model.path)
    for name, t in model.plain.items():
        assert ckpt.dtype(name) == DTYPE_NAMES[model.dtype], name
        assert t.dtype == getattr(torch, model.dtype)
    linears = {n.removesuffix(".weight") for n in model.original}
    # what stays unquantized: embeddings, norms, lm_head (and router gate, biases)
    assert "lm_head.weight" in model.plain and "model.embed_tokens.weight" in model.plain
    assert "lm_head" not in linears
    if model.method in ("gptq", "awq"):
        assert {f"{x}.bias" for x in linears} <= set(model.plain)
    if model.name == "deepseek-fp8":
        assert "model.layers.1.mlp.gate.weight" in model.plain
    # and every other Linear of the decoder is quantized
    matrices = {k for k, t in model.plain.items() if t.dim() == 2 and k.startswith("model.layers.")}
    assert matrices <= {"model.layers.1.mlp.gate.weight"}
    layers = {int(n.split(".")[2]) for n in model.original}
    assert layers == set(range(model.config["num_hidden_layers"]))


def test_bnb_quant_state_json_is_what_bitsandbytes_reads(built):
    for name in ("bnb-nf4-dq", "bnb-fp4", "bnb-nf4-bf16-storage"):
        m = built(name)
        ckpt = Checkpoint(m.path)
        for w, orig in m.original.items():
            (key,) = (k for k in m.state if k.startswith(f"{w}.quant_state."))
            state = json.loads(bytes(ckpt[key].tolist()))
            assert state["shape"] == list(orig.shape)
            assert state["dtype"] == "bfloat16" and state["blocksize"] == 64
            assert state["quant_type"] == m.quantization_config["bnb_4bit_quant_type"]
            assert ("nested_offset" in state) == m.quantization_config["bnb_4bit_use_double_quant"]


def test_the_edge_cases_are_there(built, torch):
    """What the fixtures promise beyond the plain layout."""
    ds = built("deepseek-fp8")
    partial = [n for n, w in ds.original.items() if w.shape[0] % 128 or w.shape[1] % 128]
    whole = [n for n, w in ds.original.items() if not (w.shape[0] % 128 or w.shape[1] % 128)]
    assert partial and whole
    assert ds.original["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 192)

    bnb = built("bnb-nf4-dq")
    sizes = [w.numel() for w in bnb.original.values()]
    assert any(n % 64 for n in sizes)  # a partial 4-bit block
    assert any(-(-n // 64) > 256 and (-(-n // 64)) % 256 for n in sizes)  # partial nested group

    for name in ("gptq-v1", "gptq-v1-desc-act", "gptq-v2"):
        ckpt = Checkpoint(built(name).path)
        g_idx = ckpt["model.layers.0.self_attn.q_proj.g_idx"]
        counts = torch.bincount(g_idx.long()).tolist()
        assert counts == [32, 32, 16]  # 80 inputs: the last group is cut short
        ordered = torch.equal(g_idx, torch.arange(80, dtype=torch.int32) // 32)
        assert ordered != name.endswith("desc-act")

    awq = Checkpoint(built("awq").path)
    zeros = _unpack_awq(awq["model.layers.0.mlp.gate_proj.qzeros"])
    assert (zeros[0] == 0).all() and (zeros[1] == 15).all()
    assert (awq["model.layers.0.mlp.gate_proj.qweight"] < 0).any()  # top nibble sets the sign


# --- the oracle ---------------------------------------------------------------------------


def test_dequantized_is_the_reference_read_from_the_folder(model, torch, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model.path, copy)
    moved = with_path(model, copy)
    for name, w in model.dequantized.items():
        assert w.dtype == torch.float32 and w.shape == model.original[name].shape
        assert torch.equal(reference_dequantize(moved, name), w), name
    # unquantized weights come back as they are
    head = model.plain["lm_head.weight"]
    assert torch.equal(reference_dequantize(moved, "lm_head.weight"), head.float())
    # without quantization_config: the self-describing formats still read, GPTQ/AWQ refuse
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    for name, w in model.dequantized.items():
        if model.method in ("gptq", "awq"):
            with pytest.raises(ValueError, match="no settings"):
                reference_dequantize(moved, name)
        else:
            assert torch.equal(reference_dequantize(moved, name), w), name


def test_dequantized_is_close_to_the_weight_it_was_made_from(model, torch):
    """Within the format's precision: half a step of the quantization grid, element by
    element, with the scales read from the folder."""
    ckpt = Checkpoint(model.path)
    qc = model.quantization_config
    for name, w in model.original.items():
        x = name.removesuffix(".weight")
        d = model.dequantized[name]
        err = (d - w).abs()
        if model.name == "deepseek-fp8":
            s = ckpt[f"{x}.weight_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            bound = _fp8_bound(w, s[: w.shape[0], : w.shape[1]])
            # and per block: the error is at most 1/16 of the block's amax
            for bi in range(0, w.shape[0], 128):
                for bj in range(0, w.shape[1], 128):
                    blk = (slice(bi, bi + 128), slice(bj, bj + 128))
                    assert err[blk].max() <= w[blk].abs().max() / 16, (name, bi, bj)
        elif model.method in ("fp8", "fbgemm_fp8", "compressed-tensors"):
            bound = _fp8_bound(w, ckpt[f"{x}.weight_scale"].float().expand_as(w))
        elif model.name == "bnb-int8":
            bound = 0.5 * ckpt[f"{x}.SCB"].view(-1, 1) / 127 * (1 + 1e-6) + 1e-6
        elif model.method == "bitsandbytes":
            # nearest code for w / absmax, then times the absmax as stored (8-bit coded
            # itself with double quant): half the widest code gap plus the absmax error
            code = ckpt[f"{name}.quant_map"].sort().values
            half_gap = (code[1:] - code[:-1]).max() / 2
            n = w.numel()
            flat = torch.nn.functional.pad(w.reshape(-1), (0, -n % 64)).view(-1, 64)
            amax = flat.abs().amax(dim=1)
            stored = _bnb_absmax(ckpt, name)
            bound = half_gap * amax + (stored - amax).abs() + 1e-7
            bound = bound.repeat_interleave(64)[:n].view_as(w)
        elif model.method == "gptq":
            s = ckpt[f"{x}.scales"].float()[ckpt[f"{x}.g_idx"].long()].t()
            bound = 0.51 * s
        else:
            gi = torch.arange(w.shape[1]) // qc["group_size"]
            bound = 0.51 * ckpt[f"{x}.scales"].float()[gi].t()
        assert (err <= bound).all(), (name, (err - bound).max().item())
        assert err.max() > 0, name  # it was quantized


def _bnb_absmax(ckpt, name):
    """The per-block absmax a bnb 4-bit weight is dequantized with (Table C)."""
    absmax = ckpt[f"{name}.absmax"]
    if absmax.dtype != require("torch").uint8:
        return absmax
    (key,) = (k for k in ckpt if k.startswith(f"{name}.quant_state."))
    offset = json.loads(bytes(ckpt[key].tolist()))["nested_offset"]
    outer = ckpt[f"{name}.nested_absmax"].repeat_interleave(256)[: absmax.numel()]
    return ckpt[f"{name}.nested_quant_map"][absmax.long()] * outer + offset


def _fp8_bound(w, scale):
    """Half an e4m3 step: 2**-4 relative in the normal range, 2**-10 of the scale below it."""
    return w.abs() * 2**-4 + scale * 2**-10


# --- against the libraries ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4", "bnb-nf4-bf16-storage"])
def test_bnb_4bit_reference_is_bitsandbytes_bit_for_bit(built, torch, name):
    """The pure torch reference (Table C) against ``dequantize_4bit`` on the CPU, in fp32
    and in the model's dtype."""
    functional = require("bitsandbytes.functional")
    m = built(name)
    ckpt = Checkpoint(m.path)
    for w in m.original:
        parts = {k[len(w) + 1 :]: ckpt[k] for k in m.state if k.startswith(f"{w}.")}
        qs = functional.QuantState.from_dict(dict(parts), device=torch.device("cpu"))
        native = functional.dequantize_4bit(ckpt[w], qs)
        assert native.dtype == torch.bfloat16
        qs.dtype = torch.float32
        fp32 = functional.dequantize_4bit(ckpt[w], qs)
        state = json.loads(bytes(next(v for k, v in parts.items() if "quant_state" in k).tolist()))
        ours = dequantize_bnb_4bit(
            ckpt[w],
            parts["absmax"],
            parts["quant_map"],
            state,
            parts.get("nested_absmax"),
            parts.get("nested_quant_map"),
        )
        assert torch.equal(ours, fp32), w
        assert torch.equal(m.dequantized[w], fp32), w
        assert torch.equal(ours.to(torch.bfloat16), native), w


def test_bnb_int8_reference_is_bitsandbytes_bit_for_bit(built, torch):
    """``int8_vectorwise_dequant`` multiplies by the fp32 reciprocal of 127; the textbook
    ``CB * SCB / 127`` is the same to within one ulp, not bit for bit."""
    functional = require("bitsandbytes.functional")
    m = built("bnb-int8")
    ckpt = Checkpoint(m.path)
    differs = 0
    for w in m.original:
        x = w.removesuffix(".weight")
        cb, scb = ckpt[w], ckpt[f"{x}.SCB"]
        theirs = functional.int8_vectorwise_dequant(cb, scb)
        assert torch.equal(m.dequantized[w], theirs), w
        divided = cb.float() * scb.view(-1, 1) / 127
        ulp = torch.finfo(torch.float32).eps * divided.abs()
        assert ((divided - theirs).abs() <= ulp).all(), w
        differs += int((divided != theirs).sum())
        # and what bitsandbytes made it from: the row absmax of the fp16 weight
        orig = m.original[w].to(torch.float16).float()
        assert torch.equal(scb, orig.abs().amax(dim=1)), w
    assert differs > 0


def test_fp8_block_partial_edge_blocks(built, torch):
    """kv_a_proj_with_mqa [576, 192]: 5 x 2 blocks, the last row of blocks 64 high and the
    last column 64 wide. Each block is scaled by its own amax over the valid region, the
    edges are dequantized with their own block's scale (not with a block size worked out
    from the grid), and compressed-tensors' padding dequantizer agrees in fp32."""
    m = built("deepseek-fp8")
    x = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    ckpt = Checkpoint(m.path)
    q, s = ckpt[f"{x}.weight"], ckpt[f"{x}.weight_scale_inv"]
    w, ref = m.original[f"{x}.weight"], m.dequantized[f"{x}.weight"]
    assert tuple(s.shape) == (5, 2)
    for bi, rows in enumerate((slice(0, 128), slice(512, 576))):
        for bj, cols in enumerate((slice(0, 128), slice(128, 192))):
            bi_ = 4 if bi else 0
            assert s[bi_, bj] == w[rows, cols].abs().amax() / E4M3_MAX
            assert torch.equal(ref[rows, cols], q[rows, cols].float() * s[bi_, bj])
    corner = (slice(512, 576), slice(128, 192))
    assert ((ref[corner] - w[corner]).abs() <= _fp8_bound(w[corner], s[4, 1])).all()

    # The shortcut (block = shape // grid, as transformers 5.23 does) cannot even be
    # formed here (576 rows, 5 block rows), and where the sizes happen to divide, it reads
    # the wrong scale: o_proj [192, 64] has grid [2, 1], the shortcut's blocks are 96 high.
    assert 576 % 5
    o_proj = "model.layers.0.self_attn.o_proj"
    q, s = ckpt[f"{o_proj}.weight"], ckpt[f"{o_proj}.weight_scale_inv"]
    assert tuple(s.shape) == (2, 1)
    shortcut = q.float() * s.repeat_interleave(96, 0)
    ref = m.dequantized[f"{o_proj}.weight"]
    assert torch.equal(shortcut[:96], ref[:96]) and torch.equal(shortcut[128:], ref[128:])
    assert not torch.equal(shortcut[96:128], ref[96:128])

    # An all-zero block: clamped scale, zeros back.
    kv_b = "model.layers.0.self_attn.kv_b_proj"
    assert ckpt[f"{kv_b}.weight_scale_inv"][0, 3] < 1e-12
    assert not m.dequantized[f"{kv_b}.weight"][:128, 384:512].any()

    block = require("compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer")
    dequantizer = block.FP8BlockDequantizer(dtype=torch.float32)
    for name in m.original:
        scale = ckpt[name.removesuffix(".weight") + ".weight_scale_inv"]
        theirs = dequantizer._create_dequantized_weight(ckpt[name], scale)
        assert torch.equal(m.dequantized[name], theirs), name


@pytest.mark.parametrize("name", ["ct-fp8-tensor", "ct-fp8-channel"])
def test_compressed_tensors_reads_its_config_and_decompresses_to_the_reference(built, torch, name):
    cq = require("compressed_tensors.quantization")
    naive = require("compressed_tensors.compressors.naive_quantized.base")
    transformers = require("transformers")
    m = built(name)
    qc = m.quantization_config
    assert qc["format"] == "float-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    parsed = cq.QuantizationConfig.model_validate(qc)
    scheme = parsed.config_groups["group_0"]
    strategy = name.rsplit("-", 1)[1]
    assert scheme.weights.strategy == strategy and scheme.weights.num_bits == 8
    assert scheme.input_activations.dynamic == (strategy == "channel")
    assert transformers.CompressedTensorsConfig.from_dict(qc).quantization_config is not None
    ckpt = Checkpoint(m.path)
    for w, ref in m.dequantized.items():
        x = w.removesuffix(".weight")
        parts = {"weight": ckpt[w], "weight_scale": ckpt[f"{x}.weight_scale"]}
        theirs = naive.FloatQuantizationCompressor.decompress(parts, scheme)["weight"]
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, ref.to(torch.bfloat16)), w
        # the scale is the observer's amax / 448, in bf16
        orig = m.original[w].to(torch.bfloat16)
        amax = orig.abs().amax() if strategy == "tensor" else orig.abs().amax(1, keepdim=True)
        assert torch.equal(ckpt[f"{x}.weight_scale"].view(-1), (amax / 448).view(-1))


def test_fbgemm_row_scales(built, torch):
    m = built("fbgemm-fp8")
    ckpt = Checkpoint(m.path)
    assert m.quantization_config == {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": ["lm_head"],
    }
    for w, orig in m.original.items():
        scale = ckpt[f"{w.removesuffix('.weight')}.weight_scale"].view(-1)
        want = torch.clamp(orig.abs().amax(dim=1) / E4M3_MAX, min=FBGEMM_MIN_SCALE)
        assert torch.equal(scale, want), w
    q_proj = ckpt["model.layers.0.self_attn.q_proj.weight_scale"].view(-1)
    assert q_proj[5] == FBGEMM_MIN_SCALE  # the all-zero row


def test_vllm_fp8_static_config(built):
    qc = built("vllm-fp8-static").quantization_config
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "static"
    assert "weight_block_size" not in qc


def autogptq_dequantize(qweight, qzeros, scales, g_idx, bits, v1):
    """AutoGPTQ's torch dequantization (``qlinear_cuda_old.QuantLinear.forward``), as
    written there: fp16 math, ``zeros + 1`` for the v1 format. [in, out]."""
    torch = require("torch")
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(
        torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits), wf.unsqueeze(0)
    ).to(torch.int16)
    zeros = torch.bitwise_and(zeros, (2**bits) - 1)
    if v1:
        zeros = zeros + 1
    zeros = zeros.reshape(scales.shape)
    weight = torch.bitwise_right_shift(
        torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1)
    ).to(torch.int16)
    weight = torch.bitwise_and(weight, (2**bits) - 1)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


@pytest.mark.parametrize("name", ["gptq-v1", "gptq-v1-desc-act", "gptq-v2"])
def test_gptq_reference_is_autogptq_dequantization(built, torch, name):
    m = built(name)
    qc = m.quantization_config
    v1 = qc["checkpoint_format"] == "gptq"
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True
    assert qc["desc_act"] == name.endswith("desc-act")
    ckpt = Checkpoint(m.path)
    for w, ref in m.dequantized.items():
        x = w.removesuffix(".weight")
        qweight, qzeros = ckpt[f"{x}.qweight"], ckpt[f"{x}.qzeros"]
        theirs = autogptq_dequantize(
            qweight, qzeros, ckpt[f"{x}.scales"], ckpt[f"{x}.g_idx"], 4, v1
        )
        assert theirs.dtype == torch.float16
        assert torch.equal(theirs.t(), ref.to(torch.float16)), w
        # symmetric 4-bit: zero 8, stored as 7 in v1 (0x77777777) and 8 in v2
        assert (qzeros == (0x77777777 if v1 else 0x88888888 - 2**32)).all(), w


def _unpack_awq(packed):
    """AutoAWQ's reverse order, written out nibble by nibble: [rows, cols * 8]."""
    torch = require("torch")
    nibbles = [(packed.long() >> (4 * k)) & 0xF for k in range(8)]
    cols = [nibbles[AWQ_REVERSE_ORDER[j]] for j in range(8)]
    return torch.stack(cols, dim=-1).reshape(packed.shape[0], -1)


def test_awq_reference_is_compressed_tensors_autoawq_converter(built, torch):
    awq = require("compressed_tensors.entrypoints.convert.converters.autoawq")
    cq = require("compressed_tensors.quantization")
    lifecycle = require("compressed_tensors.quantization.lifecycle.forward")
    m = built("awq")
    qc = m.quantization_config
    assert qc == {
        "bits": 4,
        "group_size": 32,
        "modules_to_not_convert": None,
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }
    converter = awq.AutoAWQConverter.from_autoawq_config(qc)
    args = cq.QuantizationArgs(
        num_bits=4, type="int", symmetric=False, group_size=32, strategy="group"
    )
    ckpt = Checkpoint(m.path)
    for w, ref in m.dequantized.items():
        x = w.removesuffix(".weight")
        qweight, qzeros, scales = ckpt[f"{x}.qweight"], ckpt[f"{x}.qzeros"], ckpt[f"{x}.scales"]
        q, scale, zero = converter._convert_gemm_module(qweight, scales, qzeros)
        theirs = lifecycle.dequantize(q, scale, zero, args=args)
        assert theirs.dtype == torch.float16
        assert torch.equal(theirs, ref.to(torch.float16)), w
        mine = scales.float()[torch.arange(qweight.shape[0]) // 32] * (
            _unpack_awq(qweight) - _unpack_awq(qzeros)[torch.arange(qweight.shape[0]) // 32]
        )
        assert torch.equal(mine.t(), ref), w


# --- transformers -------------------------------------------------------------------------

TRANSFORMERS_LOADS = [
    "bnb-nf4-dq",
    "bnb-fp4",
    "bnb-nf4-bf16-storage",
    "bnb-int8",
    "ct-fp8-tensor",
    "ct-fp8-channel",
    "deepseek-fp8",
]


@pytest.mark.parametrize("name", TRANSFORMERS_LOADS)
def test_transformers_loads_it_on_the_cpu(built, torch, name):
    """``from_pretrained`` on the CPU: every quantized Linear dequantizes (the way
    transformers' own integration does) to the reference in the model dtype, every plain
    tensor is the file's, and a forward pass gives finite logits."""
    transformers = require("transformers")
    if name.startswith(("bnb", "deepseek")):
        pytest.importorskip("accelerate", reason="transformers needs accelerate for this format")
    m = built(name)
    bf16 = torch.bfloat16
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(m.path)
    except RuntimeError as e:
        if name == "deepseek-fp8" and "conversion" in str(e):
            pytest.xfail(
                "transformers derives the fp8 block size from the scale grid "
                "(Fp8Dequantize._dequantize_one): kv_a_proj_with_mqa [576, 192] with grid "
                "[5, 2] raises, and partial blocks whose sizes divide the grid load wrong"
            )
        raise
    state = model.state_dict()
    for name_, t in m.plain.items():
        assert torch.equal(state[name_].to(t.dtype), t), name_
    for name_, ref in m.dequantized.items():
        x = name_.removesuffix(".weight")
        if m.method == "bitsandbytes":
            # before any forward: bitsandbytes repacks CPU weights on the first one
            module = model.get_submodule(x)
            bnb = require("transformers.integrations.bitsandbytes")
            got = bnb.dequantize_bnb_weight(module.weight, getattr(module, "state", None))
            assert torch.equal(got, ref if name == "bnb-int8" else ref.to(bf16)), name_
        elif m.method == "fp8":  # dequantized to bf16 on load: no fp8 kernels on the CPU
            got = _fused_expert(state, x) if ".experts." in x else state[name_]
            assert torch.equal(got, ref.to(bf16)), name_
        else:  # compressed-tensors: still compressed, the file's tensors
            assert torch.equal(state[name_].float(), Checkpoint(m.path)[name_].float()), name_
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    if m.method == "compressed-tensors":  # the first forward decompressed it
        for name_, ref in m.dequantized.items():
            weight = model.get_submodule(name_.removesuffix(".weight")).weight
            assert torch.equal(weight, ref.to(bf16)), name_


def _fused_expert(state, x):
    """transformers fuses routed experts: ``experts.gate_up_proj[e] = cat(gate, up)``,
    ``experts.down_proj[e]``; the part that is ``x`` (``...experts.N.gate_proj``)."""
    prefix, rest = x.split(".experts.")
    e, proj = rest.split(".")
    e = int(e)
    if proj == "down_proj":
        return state[f"{prefix}.experts.down_proj"][e]
    fused = state[f"{prefix}.experts.gate_up_proj"][e]
    half = fused.shape[0] // 2
    return fused[:half] if proj == "gate_proj" else fused[half:]


def test_every_builder_is_deterministic(built, tmp_path):
    """Fixed seeds: building again writes the same bytes."""
    for name in sorted(ALL):
        first, again = built(name), ALL[name](tmp_path / name)
        written = sorted(p.name for p in first.path.iterdir())
        assert written == sorted(p.name for p in again.path.iterdir())
        for f in written:
            assert (first.path / f).read_bytes() == (again.path / f).read_bytes(), (name, f)
