"""``--merge-lora`` of LoRA on parameters (``target_parameters``, PEFT's ``ParamWrapper``):
mixture-of-experts adapters made by PEFT itself, merged by fastcast, held to PEFT's own
``merge_and_unload()`` on the base loaded in float32, saved by transformers (the layout
the base's file has), then cast:

- gpt-oss: experts stacked ``[E, in, out]`` in the file (``is_transposed``);
- Qwen3-MoE and Mixtral: stacked ``[E, out, in]`` in memory, one weight per expert in
  the file (``gate_proj``/``up_proj`` rows of ``gate_up_proj``; Mixtral's ``w1``/``w3``
  under ``block_sparse_moe``), which transformers splits again when it saves;
- a 2-D parameter (``q_proj.weight``) as a Linear's weight;
- a gpt-oss MXFP4 base dequantized (``--dequantize``), merged, rounded once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_merge_lora import check_logits, check_low_precision, edited, output

import fastcast
from adapters import load_base, make_adapter
from commands import cli
from conftest import require
from models import build_moe

torch = require("torch")
peft = require("peft")
transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
#: Each kind's merged tensors in its file, for layer ``i`` (besides ``q_proj``).
FILE_EXPERTS = {
    "gpt_oss": lambda i: [f"model.layers.{i}.mlp.experts.{p}" for p in ("gate_up_proj",
                                                                       "down_proj")],
    "qwen3_moe": lambda i: [f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                            for e in range(4) for p in ("gate", "up", "down")],
    "mixtral": lambda i: [f"model.layers.{i}.block_sparse_moe.experts.{e}.w{w}.weight"
                          for e in range(4) for w in (1, 2, 3)],
}  # fmt: skip


def peft_saved(base: Path, adapter: Path, dest: Path) -> dict[str, Any]:
    """PEFT's merge into ``base`` loaded in float32, as transformers saves it (experts
    split again where the base's file stores them one by one)."""
    merged = peft.PeftModel.from_pretrained(load_base(base), adapter).merge_and_unload()
    merged.save_pretrained(dest)
    return output(dest)


def expected(kind: str) -> set[str]:
    names = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    return names | {n for i in range(2) for n in FILE_EXPERTS[kind](i)}


@pytest.fixture(scope="module", params=sorted(FILE_EXPERTS))
def moe(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    kind = request.param
    return kind, build_moe(tmp_path_factory.mktemp(kind) / "base", kind, dtype="bfloat16")


def moe_adapter(base: Path, dest: Path, **config: Any) -> Path:
    """Every expert weight and ``q_proj`` adapted; rank and alpha of one layer's
    ``down_proj`` set apart by pattern (matched against ``<module>.<parameter>``)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "target_parameters": EXPERTS,
              "rank_pattern": {"layers.1.mlp.experts.down_proj": 2},
              "alpha_pattern": {"layers.1.mlp.experts.down_proj": 3}} | config  # fmt: skip
    return make_adapter(base, dest, **config)


def test_stacked_experts_merge_as_peft(moe: tuple[str, Path], tmp_path: Path) -> None:
    """Every expert's update lands on its own rows, bf16 kept (the base's dtype): within
    1 ulp of PEFT's fp32 merge cast to bf16, every other tensor bit for bit; the output
    loads with transformers and gives PEFT's merged model's logits; verify passes."""
    kind, base = moe
    adapter = moe_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    report = fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    got, ref, before = output(out), peft_saved(base, adapter, tmp_path / "peft"), output(base)
    assert set(got) == set(ref) == set(before)
    changed = {n for n in got if not torch.equal(got[n], before[n])}
    assert changed == expected(kind) and report.tensors_merged == len(changed)
    differing = check_low_precision(got, ref, changed)
    print(f"{kind}: {differing} merged elements 1 ulp from PEFT's, none further")
    assert fastcast.verify(out, progress=False).ok
    check_logits(base, adapter, out, "bfloat16")


def test_square_experts_are_laid_as_their_model_type_says(tmp_path: Path) -> None:
    """gpt-oss with ``gate_up_proj`` square (``[E, 32, 32]``): both orientations fit the
    shapes, the model type decides (transposed, as transformers declares it)."""
    base = build_moe(tmp_path / "base", "gpt_oss", dtype="bfloat16", intermediate_size=16)
    assert list(output(base)["model.layers.0.mlp.experts.gate_up_proj"].shape) == [4, 32, 32]
    adapter = moe_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    got, ref, before = output(out), peft_saved(base, adapter, tmp_path / "peft"), output(base)
    changed = {n for n in got if not torch.equal(got[n], before[n])}
    assert changed == expected("gpt_oss")
    check_low_precision(got, ref, changed)
    assert fastcast.verify(out, progress=False).ok


def stacked_exact(base: dict[str, Any], adapter: dict[str, Any], layer: int, r: int,
                  scale: float) -> tuple[Any, Any]:  # fmt: skip
    """gpt-oss's ``gate_up_proj`` of ``layer`` merged in float64 by PEFT's einsum, and the
    bound of an fp32 merge's error, ``(r + 4) · eps32 · (|W| + |s| · |B| @ |A|)``."""
    key = f"base_model.model.model.layers.{layer}.mlp.experts.base_layer"
    w = base[f"model.layers.{layer}.mlp.experts.gate_up_proj"].double()
    experts = w.shape[0]
    a = adapter[f"{key}.lora_A.weight"].double().reshape(experts, r, -1)
    b = adapter[f"{key}.lora_B.weight"].double().reshape(-1, r, experts)
    delta = torch.einsum("o r e, e r i -> e i o", b, a)
    size = torch.einsum("o r e, e r i -> e i o", b.abs(), a.abs())
    return w + scale * delta, (r + 4) * 2.0**-24 * (w.abs() + abs(scale) * size)


def test_an_fp32_base_stays_fp32_within_fp32_rounding(tmp_path: Path) -> None:
    """Without --dtype an fp32 base stays fp32: every merged element within an fp32
    merge's rounding bound of the exact (float64) value of PEFT's einsum."""
    base = build_moe(tmp_path / "base", "gpt_oss")
    adapter = moe_adapter(base, tmp_path / "ad")
    out = tmp_path / "out"
    fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    got, ref = output(out), peft_saved(base, adapter, tmp_path / "peft")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert got[name].dtype == torch.float32
    exact, bound = stacked_exact(output(base), output(adapter), 0, 4, 2.0)
    assert bool(((got[name].double() - exact).abs() <= bound).all())
    assert bool(((ref[name].double() - exact).abs() <= bound).all())
    differ = int((got[name] != ref[name]).sum())
    print(f"fp32: {differ} of {got[name].numel()} elements differ from PEFT's fp32 merge")
    assert fastcast.verify(out, progress=False).ok


def test_one_parameter_and_a_2d_parameter(tmp_path: Path) -> None:
    """One parameter of the experts targeted (no nesting), and a 2-D one (``q_proj``'s
    weight, merged as a Linear's): PEFT's merge, bit for bit here."""
    base = build_moe(tmp_path / "base", "qwen3_moe", dtype="bfloat16")
    targets = ["mlp.experts.down_proj", "q_proj.weight"]
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
                           target_parameters=targets)  # fmt: skip
    out = tmp_path / "out"
    report = fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == 2 * (4 + 1)
    got, ref = output(out), peft_saved(base, adapter, tmp_path / "peft")
    changed = {n for n, t in output(base).items() if not torch.equal(t, got[n])}
    assert {re.sub(r"\d+", "N", n) for n in changed} == {
        "model.layers.N.mlp.experts.N.down_proj.weight",
        "model.layers.N.self_attn.q_proj.weight",
    }
    check_low_precision(got, ref, changed)
    assert fastcast.verify(out, progress=False).ok


def test_a_dequantized_mxfp4_base(tmp_path: Path) -> None:
    """The gpt-oss case: an adapter of the experts of an MXFP4 model, merged into its
    weights dequantized in fp32 (transformers' reference), rounded once to bf16. Oracle:
    PEFT's merge into the base dequantized to fp32, cast."""
    quantized_fp4 = require("quantized_fp4")
    model = quantized_fp4.gpt_oss_mxfp4(tmp_path / "q", edges=False)
    plain = tmp_path / "plain"
    fastcast.convert(model.path, "fp32", output=plain, dequantize=True, progress=False)
    adapter = make_adapter(plain, tmp_path / "ad", r=4, lora_alpha=8,
                           target_modules=["q_proj"], target_parameters=EXPERTS)  # fmt: skip
    out = tmp_path / "out"
    report = fastcast.convert(model.path, "bf16", output=out, dequantize=True,
                              merge_lora=adapter, progress=False)  # fmt: skip
    layers = json.loads((plain / "config.json").read_text())["num_hidden_layers"]
    assert report.tensors_merged == 3 * layers
    got, ref = output(out), peft_saved(plain, adapter, tmp_path / "peft")
    plain_t = output(plain)
    changed = {n for n, t in got.items() if not torch.equal(t, plain_t[n].to(t.dtype))}
    assert len(changed) == 3 * layers
    check_low_precision(got, ref, changed)
    assert fastcast.verify(out, progress=False).ok


def test_experts_merged_then_quantized_in_one_pass(tmp_path: Path) -> None:
    """``--quantize fp8-channel`` of Qwen3-MoE's merged experts: bit for bit what
    ``--quantize`` writes from the output of ``--merge-lora A --dtype fp32``; verify
    re-checks the codes and scales against PEFT's merge math."""
    base = build_moe(tmp_path / "base", "qwen3_moe", dtype="bfloat16")
    adapter = moe_adapter(base, tmp_path / "ad")
    one, f32, two = tmp_path / "one", tmp_path / "f32", tmp_path / "two"
    report = fastcast.convert(base, output=one, merge_lora=adapter, quantize="fp8-channel",
                              progress=False)  # fmt: skip
    assert report.tensors_merged_quantized == len(expected("qwen3_moe"))
    fastcast.convert(base, "fp32", output=f32, merge_lora=adapter, progress=False)
    fastcast.convert(f32, output=two, quantize="fp8-channel", progress=False)
    got, want = output(one), output(two)
    assert set(got) == set(want)
    for name, t in got.items():
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(t.view(torch.uint8), want[name].view(torch.uint8)), name
        elif name.endswith("_scale"):
            assert torch.equal(t, want[name]), name
    assert fastcast.verify(one, progress=False).ok


def rewrite(out: Path, change: Any) -> None:
    shard = out / "model.safetensors"
    state = safetensors_torch.load_file(str(shard))
    change(state)
    safetensors_torch.save_file(state, str(shard), metadata={"format": "pt"})


def test_verify_fails_an_expert_on_another_ones_rows(tmp_path: Path) -> None:
    """Two experts' merged values swapped (gpt-oss), or an expert's gate and up rows
    swapped (Qwen3-MoE, one by one): verify fails, naming the tensor."""
    base = build_moe(tmp_path / "base", "gpt_oss", dtype="bfloat16")
    out = tmp_path / "out"
    fastcast.convert(base, output=out, merge_lora=moe_adapter(base, tmp_path / "ad"),
                     progress=False)  # fmt: skip
    name = "model.layers.0.mlp.experts.down_proj"
    rewrite(out, lambda s: s.update({name: s[name][[1, 0, 2, 3]].contiguous()}))
    done = cli("verify", out)
    assert done.returncode == 1 and f"mismatch: {name}" in done.stdout, done.stdout

    qwen = build_moe(tmp_path / "qwen", "qwen3_moe", dtype="bfloat16")
    out = tmp_path / "qwen-out"
    fastcast.convert(qwen, output=out, merge_lora=moe_adapter(qwen, tmp_path / "qad"),
                     progress=False)  # fmt: skip
    gate, up = (f"model.layers.1.mlp.experts.2.{p}_proj.weight" for p in ("gate", "up"))
    rewrite(out, lambda s: s.update({gate: s[up], up: s[gate]}))
    done = cli("verify", out)
    assert done.returncode == 1 and f"mismatch: {gate}" in done.stdout, done.stdout


def nested(sd: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of the outer wrapper dropped: the inner one's left under base_layer."""
    return {k: v for k, v in sd.items() if "experts.lora_" not in k}


REFUSALS = {
    "another size": (
        "qwen3_moe", {"moe_intermediate_size": 16}, {},
        "fit none of model.layers.0.mlp.experts.down_proj, "
        "model.layers.0.mlp.experts.gate_up_proj in the base",
    ),
    "rank disagrees with the config": (
        "gpt_oss", {}, {"config": {"rank_pattern": {}}},
        "model.layers.1.mlp.experts.down_proj: lora_A [8, 48] is not rank 4 for each of its 4",
    ),
    "a parameter the base lacks": (
        "gpt_oss", {}, {"config": {"target_parameters": ["mlp.experts.gate_proj"]}},
        "model.layers.0.mlp.experts.gate_proj, which the base does not have",
    ),
    "DoRA on parameters": (
        "gpt_oss", {}, {"config": {"use_dora": True}}, "with DoRA, a bias",
    ),
    "nested tensors without target_parameters": (
        "gpt_oss", {}, {"config": {"target_parameters": None}},
        "module model.layers.0.mlp.experts.base_layer has rank 16 but the config says 4",
    ),
    "a base missing an expert's up_proj": (
        "qwen3_moe", {}, {"drop": "model.layers.0.mlp.experts.3.up_proj.weight"},
        "not all whole: no model.layers.0.mlp.experts.3.up_proj.weight",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_in_one_line_nothing_written(tmp_path: Path, case: str) -> None:
    kind, other, change, message = REFUSALS[case]
    base = build_moe(tmp_path / "base", kind, dtype="bfloat16")
    adapter = moe_adapter(build_moe(tmp_path / "other", kind, **other), tmp_path / "ad0")
    adapter = edited(adapter, tmp_path / "ad", config=change.get("config"))
    if "drop" in change:
        rewrite(base, lambda s: s.pop(change["drop"]))
    before = {p: p.read_bytes() for p in [*base.iterdir(), *adapter.iterdir()]}
    out = tmp_path / "out"
    done = cli("convert", base, "--merge-lora", adapter, "-o", out)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcast: error:"), done.stderr
    assert message in lines[0], lines[0]
    assert not out.exists()
    assert {p: p.read_bytes() for p in before} == before


def test_inspect_shows_the_parameters(moe: tuple[str, Path], tmp_path: Path) -> None:
    _, base = moe
    done = cli("inspect", moe_adapter(base, tmp_path / "ad"))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "adapter:" in x)
    assert "on 2 modules and 4 parameters (target_parameters: " in line, line
    assert "mlp.experts.gate_up_proj" in line and "mlp.experts.down_proj" in line
    assert "rank 2, 4, alpha 3, 8" in line


def test_the_transposed_experts_are_transformers(tmp_path: Path) -> None:
    """``TRANSPOSED`` is every model type whose experts class transformers declares
    ``is_transposed=True`` (PEFT lays their update ``[E, in, out]``)."""
    from fastcast._plan.experts import TRANSPOSED

    models = Path(transformers.__file__).parent / "models"
    found = set()
    for modeling in models.glob("*/modeling_*.py"):
        if re.search(r"is_transposed\s*=\s*True", modeling.read_text()):
            for config in modeling.parent.glob("configuration_*.py"):
                found |= set(re.findall(r'model_type = "([^"]+)"', config.read_text()))
    assert found == TRANSPOSED


def test_a_stack_of_no_experts_fits_nothing(tmp_path: Path) -> None:
    """A hostile base holding a ``[0, in, out]`` parameter: no way to update it (not a
    division by zero experts)."""
    from fastcast._plan.experts import stacked
    from fastcast._source.entries import TensorEntry

    empty = TensorEntry("m.experts.down_proj", "BF16", (0, 4, 4), tmp_path, (0, 0))
    assert stacked(empty.name, "model", empty, "gpt_oss") == []
    one = TensorEntry("m.experts.down_proj", "BF16", (1, 4, 6), tmp_path, (0, 0))
    assert [(p.ins, p.outs, p.transpose) for p in stacked(one.name, "model", one, "")] == [
        (6, 4, False)
    ]  # one expert, not transposed: PEFT's untransposed update of a transposed one is refused
