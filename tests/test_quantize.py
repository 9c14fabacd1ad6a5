"""--quantize: a plain model becomes an fp8 checkpoint that transformers (and vLLM, by
its config) loads. ``fp8``: 128x128 blocks, F32 ``weight_scale_inv``, the ``fp8``
quantization_config; ``fp8-channel``: one F32 ``weight_scale`` per row, compressed-tensors'
``FP8_DYNAMIC``. Only decoder Linear weights are quantized, each bit for bit the torch
reference (``quantized.quantize_fp8``: per block ``s = amax.clamp(min=1e-12) / 448`` in
fp32, ``q = clamp(W / s, ±448)`` to e4m3); embeddings, norms, lm_head, router gates and
biases are cast to the target; a weight whose shape does not fit the blocks (or is fused
with one that does not) stays in the target dtype and is listed. Built on a
transformers Llama (its k/v projections misfit), a transformers Mixtral (everything
fits) and the DeepSeek-V3 fixture dequantized (only kv_b_proj fits 128x128 blocks)."""

from __future__ import annotations

import json

import pytest
from packaging.version import Version

import fastcast
from commands import cli, killed, ok, refused
from conftest import require
from folders import snapshot
from models import build_llama, build_mixtral
from quantized import ALL, load_all, quantize_fp8, same_bits

#: The target each model's conversion writes (every float dtype --quantize takes).
TARGET = {"llama": "bf16", "mixtral": "fp16", "deepseek": "fp32"}
TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: Every decoder Linear, by the last part of its module name.
LINEARS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"},
    "deepseek": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                 "gate_proj", "up_proj", "down_proj"},
}  # fmt: skip
#: Those that fit fp8's 128x128 blocks: Llama's k/v are [64, 256] (one kv head), so its
#: q_proj, fused with them in vLLM, stays too; DeepSeek's hidden size is 192.
FITS = {
    "llama": {"o_proj", "gate_proj", "up_proj", "down_proj"},
    "mixtral": LINEARS["mixtral"],
    "deepseek": {"kv_b_proj"},
}
SCALE = {"fp8": "weight_scale_inv", "fp8-channel": "weight_scale"}
METHOD = {"fp8": "fp8", "fp8-channel": "compressed-tensors"}


def llama(tmp_path):
    return build_llama(tmp_path / "llama", dtype="bfloat16", hidden_size=256,
                       intermediate_size=512, num_key_value_heads=1,
                       tie_word_embeddings=False, attention_bias=True)  # fmt: skip


def mixtral(tmp_path):
    return build_mixtral(tmp_path / "mixtral", dtype="bfloat16", hidden_size=128,
                         intermediate_size=256, num_key_value_heads=4)  # fmt: skip


def deepseek(tmp_path):
    """The DeepSeek-V3 fixture as a plain bf16 model: router gates, an fp32-pinned
    ``e_score_correction_bias``, MLA projections of every shape."""
    source = ALL["deepseek-fp8"](tmp_path / "fp8")
    out = tmp_path / "deepseek"
    fastcast.convert(source.path, "bf16", output=out, dequantize=True, progress=False)
    return out


MODELS = {"llama": llama, "mixtral": mixtral, "deepseek": deepseek}


def module(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``up_proj``."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


def decoder_linears(model: str, tensors: dict) -> set[str]:
    return {n for n in tensors if n.endswith(".weight") and module(n) in LINEARS[model]}


def quantized_names(model: str, scheme: str, tensors: dict) -> set[str]:
    fits = FITS[model] if scheme == "fp8" else LINEARS[model]
    return {n for n in decoder_linears(model, tensors) if module(n) in fits}


def block_of(scheme: str, weight) -> tuple[int, int]:
    return (128, 128) if scheme == "fp8" else (1, weight.shape[1])


def quantize(folder, out, scheme, target, *extra):
    """``fastcast convert --quantize``; the report, as JSON."""
    report = out.parent / f"{out.name}.json"
    ok(cli("convert", folder, "-o", out, "--dtype", target, "--quantize", scheme,
           "--report", report, *extra))  # fmt: skip
    return json.loads(report.read_text())


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_quantized_weight_is_the_torch_reference(tmp_path, model, scheme):
    torch = require("torch")
    folder = MODELS[model](tmp_path)
    target = TARGET[model]
    out = tmp_path / "out"
    report = quantize(folder, out, scheme, target)
    src, got = load_all(folder), load_all(out)
    quantized = quantized_names(model, scheme, src)
    assert quantized and report["tensors_quantized"] == len(quantized)
    scales = set()
    for name in quantized:
        q, s = quantize_fp8(src[name], block_of(scheme, src[name]))
        scale = f"{name.removesuffix('.weight')}.{SCALE[scheme]}"
        scales.add(scale)
        assert same_bits(got[name], q), name
        assert same_bits(got[scale], s), scale
        if scheme == "fp8-channel":
            assert got[scale].shape == (src[name].shape[0], 1)
    want = getattr(torch, TORCH[target])
    for name, value in src.items():
        if name in quantized:
            continue
        if name.endswith("e_score_correction_bias"):  # fp32, pinned by its model class
            assert same_bits(got[name], value), name
        else:  # embeddings, norms, lm_head, router gates, biases, misfits
            assert same_bits(got[name], value.to(want)), name
    assert set(got) == set(src) | scales, "nothing else is written"

    misfits = decoder_linears(model, src) - quantized
    routers = {n for n in src if n.endswith((".mlp.gate.weight", "block_sparse_moe.gate.weight"))}
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    listed = {"lm_head"} | {n.removesuffix(".weight") for n in misfits | routers}
    if scheme == "fp8":
        assert qc["weight_block_size"] == [128, 128]
        assert set(qc["modules_to_not_convert"]) == set(qc["ignored_layers"]) == listed
    else:
        assert set(qc["ignore"]) == listed
    assert qc["quant_method"] == METHOD[scheme]
    assert config["torch_dtype"] == TORCH[target]
    warned = " ".join(report["warnings"])
    own = {n for n in misfits if model != "llama" or module(n) != "q_proj"}
    if own:
        assert f"{len(own)} decoder Linear weight(s) left unquantized" in warned
    if model == "llama" and scheme == "fp8":
        assert "2 more left unquantized because a weight fused with them" in warned
        assert "model.layers.0.self_attn.q_proj.weight" in warned
    record = json.loads((out / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "quantize"
    assert record["quantization"]["method"] == METHOD[scheme]
    info = fastcast.inspect(out)
    assert info.quantization is not None and info.quantization.startswith(METHOD[scheme])
    assert not info.warnings


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_transformers_loads_it_with_no_arguments(tmp_path, model, scheme):
    """The output loads on the CPU as it is (transformers dequantizes FineGrained fp8 to
    bf16 without a GPU; compressed-tensors decompresses fp8-channel), every key found,
    with the logits of a plain checkpoint holding ``fp32(q) * s`` rounded to bf16.

    compressed-tensors loads ``weight_scale`` into a parameter of the model's dtype, so
    the F32 scales (exact in vLLM, which keeps them F32) of the Linears it manages reach
    transformers rounded to bf16: their weights are ``fp32(q) * bf16(s)``, and so are the
    reference's. Weights transformers fuses on loading (Mixtral's experts, no Linears)
    it dequantizes itself, with the F32 scale."""
    torch, st = require("torch"), require("safetensors.torch")
    transformers = require("transformers")
    folder = MODELS[model](tmp_path)
    out = tmp_path / "out"
    quantize(folder, out, scheme, "bf16")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert loaded.dtype == torch.bfloat16
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stored = load_all(out)
    managed = {n for n, m in loaded.named_modules() if hasattr(m, "quantization_scheme")}
    state = {}
    for name, value in stored.items():
        scale = f"{name.removesuffix('.weight')}.{SCALE[scheme]}"
        if name.endswith(("_scale", "_scale_inv")):
            continue
        if scale not in stored:
            state[name] = value
            continue
        s = stored[scale]
        if name.removesuffix(".weight") in managed:
            s = s.to(torch.bfloat16).float()
        rows, cols = value.shape
        b0, b1 = block_of(scheme, value)
        full = s.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
        state[name] = (value.float() * full).to(torch.bfloat16)
    reference = tmp_path / "reference"
    reference.mkdir()
    st.save_file(state, str(reference / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (reference / "config.json").write_text(json.dumps(config))
    expected = transformers.AutoModelForCausalLM.from_pretrained(reference)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    if scheme == "fp8-channel":
        # FP8_DYNAMIC also quantizes each token's activations to fp8 in the forward (what
        # vLLM's kernels do): compare the weights compressed-tensors decompressed on the
        # first forward, then the logits with that activation step turned off.
        from compressed_tensors.quantization import disable_quantization

        with torch.no_grad():
            loaded(ids)
        weights = loaded.state_dict()  # transformers fuses Mixtral's experts: not those
        checked = [n for n in state if f"{n}_scale" in stored and n in weights]
        assert checked
        for name in checked:
            assert same_bits(weights[name], state[name]), name
        loaded.apply(disable_quantization)
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
    assert torch.equal(got, want)


def test_compressed_tensors_reads_the_fp8_channel_config_and_writes_the_same(tmp_path):
    """compressed-tensors parses the config fastcast writes by hand, and serialises its own
    FP8_DYNAMIC preset (ModelCompressor.update_config) to exactly the same keys and
    values."""
    ct = require("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    out = tmp_path / "out"
    quantize(mixtral(tmp_path), out, "fp8-channel", "bf16")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    group = parsed.config_groups["group_0"]
    assert (group.weights.type, group.weights.strategy, group.weights.num_bits) == (
        "float", "channel", 8,
    )  # fmt: skip
    assert group.input_activations.dynamic and group.input_activations.strategy == "token"
    assert parsed.format == "float-quantized" and parsed.quantization_status == "compressed"
    theirs = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        quant_method="compressed-tensors",
        format="float-quantized",
        quantization_status="compressed",
        ignore=qc["ignore"],
    )
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")
    ModelCompressor(quantization_config=theirs).update_config(str(tmp_path / "theirs"))
    written = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    # Every key and value as the installed compressed-tensors writes them; "version" is
    # the writer's own release: fastcast names the release whose serialisation it
    # reproduces, which must not be newer than the one installed.
    assert {k: v for k, v in written.items() if k != "version"} == {
        k: v for k, v in qc.items() if k != "version"
    }
    assert written["version"] == ct.__version__
    assert Version(qc["version"]) <= Version(ct.__version__)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_round_trip_gives_q_times_s_and_verify_checks_both_ways(tmp_path, scheme):
    """--quantize then --dequantize --dtype fp32 gives exactly fp32(q) * s; verify is OK
    on both outputs, and finds one flipped byte of a quantized weight."""
    torch, st = require("torch"), require("safetensors.torch")
    folder = llama(tmp_path)
    fp8, back = tmp_path / "fp8", tmp_path / "back"
    quantize(folder, fp8, scheme, "bf16")
    ok(cli("convert", fp8, "-o", back, "--dtype", "fp32", "--dequantize"))
    stored, plain = load_all(fp8), load_all(back)
    weights = {n for n in stored if stored[n].dtype == torch.float8_e4m3fn}
    assert weights
    for name, value in stored.items():
        scale = f"{name.removesuffix('.weight')}.{SCALE[scheme]}"
        if name in weights:
            s = stored[scale]
            rows, cols = value.shape
            b0, b1 = block_of(scheme, value)
            full = s.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
            assert same_bits(plain[name], value.float() * full), name
        elif not name.endswith(SCALE[scheme]):
            assert same_bits(plain[name], value.float()), name
    assert set(plain) == {n for n in stored if not n.endswith(SCALE[scheme])}
    assert "OK" in ok(cli("verify", fp8))
    assert "OK" in ok(cli("verify", back))
    weight = sorted(weights)[0]
    for f in sorted(fp8.glob("*.safetensors")):
        state = st.load_file(str(f))
        if weight in state:
            flipped = state[weight].view(torch.uint8).clone()
            flipped.view(-1)[3] ^= 0x01
            state[weight] = flipped.view(torch.float8_e4m3fn)
            st.save_file(state, str(f), metadata={"format": "pt"})
    r = cli("verify", fp8)
    assert r.returncode == 1 and "torch's reference quantization" in r.stdout, r.stdout
    assert f"mismatch: {weight}" in r.stdout


def test_what_cannot_be_quantized_is_refused_with_one_line(tmp_path):
    """An already quantized source (without --dequantize), --keep-quantized with
    --quantize, --dequantize without a --dtype, an fp8 or fp64 target, a model with nothing
    to quantize: one line each, nothing written, the source untouched."""
    fp8 = ALL["deepseek-fp8"](tmp_path / "q")
    plain = llama(tmp_path)
    tiny = build_llama(tmp_path / "tiny", dtype="bfloat16")  # 64 wide: nothing fits
    out = tmp_path / "out"
    cases = [
        ((fp8.path, "--dtype", "bf16", "--quantize", "fp8"), ["already quantized", "--dequantize"]),
        ((plain, "--dtype", "bf16", "--quantize", "fp8", "--keep-quantized"),
         ["quantize and keep_quantized exclude each other"]),
        ((plain, "--quantize", "fp8", "--dequantize"), ["--dequantize needs --dtype"]),
        ((plain, "--dtype", "fp8_e4m3", "--quantize", "fp8"), ["not fp8_e4m3"]),
        ((plain, "--dtype", "fp64", "--quantize", "fp8-channel"), ["not fp64"]),
        ((tiny, "--dtype", "bf16", "--quantize", "fp8"),
         ["would quantize nothing", "fits fp8's 128x128 blocks", "nothing was written"]),
    ]  # fmt: skip
    for args, words in cases:
        before = snapshot(args[0])
        refused(cli("convert", *args, "-o", out), *words)
        assert not out.exists() and snapshot(args[0]) == before, args
    ok(cli("convert", tiny, "-o", out, "--dtype", "bf16", "--quantize", "fp8-channel"))
    with pytest.raises(ValueError, match="quantize must be one of fp8, fp8-channel"):
        fastcast.convert(plain, "bf16", output=tmp_path / "o", quantize="int4")


def test_keep_keeps_a_matching_weight_unquantized_and_lists_it(tmp_path):
    folder = llama(tmp_path)
    out = tmp_path / "out"
    kept = "model.layers.1.mlp.down_proj.weight"
    quantize(folder, out, "fp8", "fp16", "--keep", kept)
    src, got = load_all(folder), load_all(out)
    assert same_bits(got[kept], src[kept]), "left in its own dtype (bf16), not fp16"
    assert f"{kept.removesuffix('.weight')}.weight_scale_inv" not in got
    other = "model.layers.0.mlp.down_proj.weight"
    assert same_bits(got[other], quantize_fp8(src[other])[0])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in qc["modules_to_not_convert"]
    assert "model.layers.1.mlp.down_proj" in qc["ignored_layers"]
    assert "OK" in ok(cli("verify", out))


def test_scales_of_an_fp32_model_are_not_reported_as_kept_by_keep(tmp_path):
    """Scales are F32 whatever the target: quantizing an fp32 model leaves them in their
    weight's dtype, which is not ``--keep`` keeping anything."""
    folder = build_llama(tmp_path / "llama", dtype="float32", hidden_size=256,
                         intermediate_size=512, num_key_value_heads=1)  # fmt: skip
    report = quantize(folder, tmp_path / "out", "fp8", "bf16")
    assert report["kept"] == []
    assert not [w for w in report["warnings"] if "--keep" in w]
    assert report["tensors_quantized"] > 0


def test_weights_and_scales_share_shards_in_any_chunking_and_resume(tmp_path):
    """Small shards: every scale sits in its weight's shard. 64 KiB chunks (a chunk is
    then one block-row, 128 rows of 512 f32 values: larger than the chunk, as it must
    be) give the same bytes. A run killed after writing every shard resumes by checking
    each against its journaled digest, and reuses them all."""
    folder = llama(tmp_path)
    one, small, resumed = tmp_path / "one", tmp_path / "small", tmp_path / "resumed"
    args = ("--quantize", "fp8", "--dtype", "bf16", "--shard-size", "300KB")
    ok(cli("convert", folder, "-o", one, *args))
    index = json.loads((one / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    for name, shard in index.items():
        if name.endswith(".weight_scale_inv"):
            assert index[name.removesuffix("_scale_inv")] == shard, name
    ok(cli("convert", folder, "-o", small, *args, "--threads", "2", "--max-memory", "256KiB"))
    killed("executed", "convert", folder, "-o", resumed, *args)
    report = fastcast.convert(folder, "bf16", output=resumed, quantize="fp8",
                              shard_size="300KB", resume=True, progress=False)  # fmt: skip
    assert sorted(report.reused) == sorted(set(index.values()))
    for f in sorted(one.glob("*.safetensors")):
        assert f.read_bytes() == (small / f.name).read_bytes(), f.name
        assert f.read_bytes() == (resumed / f.name).read_bytes(), f.name
    assert "OK" in ok(cli("verify", resumed))


def test_nan_and_underflow_are_counted_and_kept_as_torch_keeps_them(tmp_path):
    """A NaN makes its block's scale NaN and every value of the block NaN (torch's amax
    and clamp keep NaN); it is counted as a NaN in the input. Tiny values beside a large
    one round to 0 in e4m3 and are counted as underflow."""
    torch, st = require("torch"), require("safetensors.torch")
    folder = llama(tmp_path)
    weights = folder / "model.safetensors"
    state = st.load_file(str(weights))
    nan, tiny = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    state[nan][3, 5] = float("nan")
    state[tiny][0, :128] = 1e-6
    state[tiny][0, 0] = 100.0
    st.save_file(state, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    report = quantize(folder, out, "fp8", "bf16")
    losses = {t["name"]: t for t in report["loss"]}
    assert losses[nan]["nan_in"] == 1 and report["loss_total"]["nan_in"] == 1
    assert losses[tiny]["underflow"] >= 127 and losses[tiny]["overflow"] == 0
    got = load_all(out)
    s = got[f"{nan.removesuffix('.weight')}.weight_scale_inv"]
    assert s[0, 0].isnan() and not s[0, 1:].isnan().any() and not s[1:].isnan().any()
    codes = got[nan].view(torch.uint8)[:128, :128] & 0x7F
    assert bool((codes == 0x7F).all()), "the whole block is NaN"
    assert same_bits(got[tiny], quantize_fp8(state[tiny])[0])
    assert "OK" in ok(cli("verify", out))


def test_the_output_is_what_inspect_calls_a_quantized_model(tmp_path):
    out = tmp_path / "out"
    quantize(llama(tmp_path), out, "fp8", "bf16")
    stdout = ok(cli("inspect", out))
    assert "quantized: fp8 (e4m3, 128x128 blocks; from config.json)" in stdout
    assert "quantized to fp8 (e4m3, 128x128 blocks)" in stdout
    assert "warning" not in stdout
