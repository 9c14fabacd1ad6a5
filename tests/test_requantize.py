"""``--dequantize --quantize``: a quantized model requantized to fp8 in one run, each
weight dequantized exactly in f32 and quantized from those values, never rounded to the
target in between. Oracle: the two runs a user would make otherwise, ``--dequantize
--dtype fp32`` (held to each format's library elsewhere) then ``--quantize`` (held to
the torch reference elsewhere): the same bytes for every tensor, the same configs; a
tensor the model pins in fp32 stays fp32, as ``--dequantize`` leaves it. Run on every
format ``--dequantize`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastcast
from commands import cli, ok, refused
from folders import snapshot
from quantized import ALL, QuantModel, load_all, same_bits
from quantized_fp4 import ALL_FP4

#: Every dequantizable format; ``fp8`` needs 128x128 blocks, which only DeepSeek-V3's
#: kv_b_proj has among the fixtures: the others take ``fp8-channel``.
FORMATS = [*ALL, *(n for n in ALL_FP4 if n != "deepseek-v4")]


def build(name: str, where: Path) -> QuantModel:
    return (ALL.get(name) or ALL_FP4[name])(where)


def configs(folder: Path) -> dict[str, object]:
    return {p.relative_to(folder).as_posix(): json.loads(p.read_text())
            for p in folder.rglob("config.json")}  # fmt: skip


@pytest.mark.parametrize("name", FORMATS)
def test_one_run_is_the_fp32_dequantization_quantized(tmp_path: Path, name: str) -> None:
    model = build(name, tmp_path / "src")
    scheme = "fp8" if name == "deepseek-fp8" else "fp8-channel"
    before = snapshot(model.path)
    one = tmp_path / "one"
    report = fastcast.convert(model.path, "bf16", output=one, dequantize=True,
                              quantize=scheme, progress=False)  # fmt: skip
    assert snapshot(model.path) == before
    f32, two = tmp_path / "f32", tmp_path / "two"
    fastcast.convert(model.path, "fp32", output=f32, dequantize=True, progress=False)
    fastcast.convert(f32, "bf16", output=two, quantize=scheme, progress=False)
    got, want = load_all(one), load_all(two)
    assert sorted(got) == sorted(want)
    plain = load_all(f32)
    pinned = []
    for n, t in got.items():
        if same_bits(t, want[n]):
            continue
        # --quantize casts a plain model's fp32 bias to bf16; --dequantize keeps the
        # tensors a quantized model pins in fp32
        assert t.dtype == plain[n].dtype and same_bits(t, plain[n]), n
        pinned.append(n)
    assert all("e_score_correction_bias" in n for n in pinned), pinned
    fp8 = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert report.tensors_quantized == len(fp8) > 0
    # gpt-oss's MXFP4 weights are 3-D experts, which --quantize leaves in the target
    src = load_all(model.path)
    floats = (torch.float32, torch.bfloat16, torch.float16)
    requantized = [
        n for n in fp8 if n not in src or src[n].dtype not in floats or src[n].shape != got[n].shape
    ]  # bnb's nibbles in a bf16 container
    assert report.tensors_dequantized_quantized == len(requantized)
    assert requantized or name == "gpt-oss-mxfp4", fp8
    assert configs(one) == configs(two)
    assert not (one / "hf_quant_config.json").exists()
    record = json.loads((one / "fastcast.json").read_text())
    assert record["quantization"]["mode"] == "quantize"
    assert record["quantization"]["dequantized"] == (model.method or "modelopt")  # sidecar
    assert fastcast.verify(one, progress=False).ok


def test_cli_says_what_it_did_and_resumes(tmp_path: Path) -> None:
    """The summary counts the weights dequantized first and names the config change; the
    same command again finds the output done; verify holds each weight to the reference
    dequantization quantized by torch."""
    model = ALL["deepseek-fp8"](tmp_path / "src")
    out = tmp_path / "out"
    args = ("convert", model.path, "--dequantize", "--dtype", "bf16", "--quantize", "fp8",
            "-o", out)  # fmt: skip
    said = ok(cli(*args))
    assert "2 quantized to fp8 (+ as many scales; 2 of them dequantized first)" in said, said
    assert "quantization_config: present -> fp8 (e4m3, 128x128 blocks)" in said, said
    again = ok(cli(*args, "--resume"))
    assert "already converted" in again, again
    verified = ok(cli("verify", out))
    assert "OK" in verified.splitlines()[0] and "torch" in verified, verified


def test_verify_fails_codes_quantized_from_a_rounded_weight(tmp_path: Path) -> None:
    """Codes quantized from the weight rounded to bf16 first, or a scale off by 1%, are
    not the one-run result: verify names each."""
    st = pytest.importorskip("safetensors.torch")
    model = ALL["bnb-nf4-dq"](tmp_path / "src")
    one, bf16, rounded = tmp_path / "one", tmp_path / "bf16", tmp_path / "rounded"
    fastcast.convert(model.path, "bf16", output=one, dequantize=True, quantize="fp8-channel",
                     progress=False)  # fmt: skip
    fastcast.convert(model.path, "bf16", output=bf16, dequantize=True, progress=False)
    fastcast.convert(bf16, "bf16", output=rounded, quantize="fp8-channel", progress=False)
    shard = next(one.glob("*.safetensors"))
    state = st.load_file(str(shard))
    other = load_all(rounded)
    differs = [n for n, t in state.items() if n.endswith(".weight") and not same_bits(t, other[n])]
    assert differs, "rounding to bf16 first changes some codes"
    off = next(n for n in state if n.endswith("weight_scale"))
    state[differs[0]] = other[differs[0]]
    state[off] = state[off] * 1.01
    st.save_file(state, str(shard), metadata={"format": "pt"})
    done = cli("verify", one)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for name in (differs[0], off):
        assert f"mismatch: {name} ({shard.name})" in done.stdout, done.stdout


def test_what_cannot_be_requantized_is_refused_in_one_line(tmp_path: Path) -> None:
    """--quantize on a quantized model without --dequantize says to add it; --dequantize
    needs a --dtype; --keep-quantized excludes --quantize; a layout or method --dequantize
    refuses is refused the same. Nothing written, the source untouched."""
    fp8 = ALL["deepseek-fp8"](tmp_path / "q")
    out = tmp_path / "out"
    cases = [
        ((fp8.path, "--dtype", "bf16", "--quantize", "fp8"),
         ["already quantized", "add --dequantize"]),
        ((fp8.path, "--dequantize", "--quantize", "fp8"), ["--dequantize needs --dtype"]),
        ((fp8.path, "--dtype", "bf16", "--keep-quantized", "--quantize", "fp8"),
         ["quantize and keep_quantized exclude each other", "--dequantize"]),
        ((fp8.path, "--dtype", "fp8_e4m3", "--dequantize", "--quantize", "fp8"), ["not fp8_e4m3"]),
    ]  # fmt: skip
    v4 = ALL_FP4["deepseek-v4"](tmp_path / "v4")  # a layout --dequantize refuses
    hqq = ALL["deepseek-fp8"](tmp_path / "hqq")  # a method it does not know
    config = json.loads((hqq.path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (hqq.path / "config.json").write_text(json.dumps(config))
    cases += [
        ((v4.path, "--dtype", "bf16", "--dequantize", "--quantize", "fp8"),
         ["--dequantize does not reconstruct DeepSeek-V4-style fp8"]),
        ((hqq.path, "--dtype", "bf16", "--dequantize", "--quantize", "fp8"), ["hqq"]),
    ]  # fmt: skip
    for args, words in cases:
        before = snapshot(args[0])
        refused(cli("convert", *args, "-o", out), *words)
        assert not out.exists() and snapshot(args[0]) == before, args


def test_a_plain_model_is_quantized_with_a_note(tmp_path: Path) -> None:
    """``--dequantize`` on a plain model changes nothing, and says so; --quantize runs."""
    fp8 = ALL["deepseek-fp8"](tmp_path / "q")
    plain = tmp_path / "plain"
    fastcast.convert(fp8.path, "bf16", output=plain, dequantize=True, progress=False)
    out = tmp_path / "out"
    said = ok(cli("convert", plain, "--dtype", "bf16", "--dequantize", "--quantize", "fp8",
                  "-o", out))  # fmt: skip
    assert "--dequantize changed nothing" in said, said
    record = json.loads((out / "fastcast.json").read_text())
    assert "dequantized" not in record["quantization"]
    assert fastcast.verify(out, progress=False).ok
