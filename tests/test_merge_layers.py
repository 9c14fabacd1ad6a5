"""``--merge-lora`` of an adapter trained with ``layer_replication``: the output is the
deeper model the adapter was trained on (layer ``j`` = base layer ``map[j]`` plus layer
``j``'s update), which PEFT's own merge cannot write (peft#1707: it adds every copy's
update into the one shared weight and saves the base's depth). The oracle is PEFT's
model as it trains and runs the adapter, unmerged: its logits, and per weight PEFT's
merge arithmetic for one copy (``base_layer.weight + get_delta_weight()``, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_merge_lora import edited, output, ulp_distance

import fastcast
from adapters import load_base, make_adapter
from commands import cli
from conftest import require
from models import build_llama, build_moe

torch = require("torch")
peft = require("peft")
transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

#: Layers 0, 1, 2, 1, 2, 3 of a 4-layer base.
MAP = [[0, 3], [1, 4]]
SOURCES = [0, 1, 2, 1, 2, 3]
TOKENS = torch.arange(1, 17).view(1, -1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("llama") / "base", tie_word_embeddings=False,
                       num_hidden_layers=4)  # fmt: skip


def peft_model(base: Path, adapter: Path) -> Any:
    """PEFT's model of the adapter (its layers replicated, weights shared), unmerged, in
    float32."""
    return peft.PeftModel.from_pretrained(load_base(base), adapter).eval()


def peft_copies(model: Any) -> dict[str, Any]:
    """Each LoRA layer of each copy merged on its own, as PEFT's merge computes it:
    ``base_layer.weight + get_delta_weight()`` in fp32, named as the output's layers."""
    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and hasattr(module, "base_layer"):
            with torch.no_grad():
                delta = module.get_delta_weight("default")
                found[f"{name}.weight"] = module.base_layer.weight + delta
    return found


def check_deeper(base: Path, adapter: Path, out: Path, dtype: Any) -> int:
    """The output is the adapter's model: every tensor of layer ``j`` base layer
    ``SOURCES[j]``'s (cast), the updated ones within 1 ulp of PEFT's merge of that copy;
    its logits PEFT's; returns how many merged elements differ from PEFT's by an ulp."""
    got, before, model = output(out), output(base), peft_model(base, adapter)
    copies = peft_copies(model)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(SOURCES)
    outside = {n for n in before if not n.startswith("model.layers.")}
    layer_names = {n.split(".", 3)[3] for n in before if n.startswith("model.layers.0.")}
    want = outside | {f"model.layers.{j}.{n}" for j in range(len(SOURCES)) for n in layer_names}
    assert set(got) == want
    differing = 0
    for name, t in got.items():
        assert t.dtype == dtype, name
        if name in copies:
            d = ulp_distance(t, copies[name].to(dtype))
            assert int(d.max()) <= 1, f"{name}: {int(d.max())} ulp from PEFT's merge of it"
            differing += int((d > 0).sum())
            continue
        source = name
        if name.startswith("model.layers."):
            j, rest = name.split(".", 3)[2:]
            source = f"model.layers.{SOURCES[int(j)]}.{rest}"
        assert torch.equal(t, before[source].to(dtype)), name
    assert len(copies) == 2 * len(SOURCES)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want_logits = model(TOKENS).logits.float()
        got_logits = merged.to(torch.float32)(TOKENS).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got_logits, want_logits, atol=tol, rtol=tol)
    return differing


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_replicated_layers_make_the_deeper_model(
    llama: Path, tmp_path: Path, dtype: str | None
) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", r=4, lora_alpha=8, layer_replication=MAP,
                           target_modules=["q_proj", "down_proj"])  # fmt: skip
    out = tmp_path / "out"
    report = fastcast.convert(llama, dtype, output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == 2 * len(SOURCES)
    want = torch.bfloat16 if dtype else torch.float32
    differing = check_deeper(llama, adapter, out, want)
    print(f"{dtype or 'fp32'}: {differing} merged elements an ulp from PEFT's merge of a copy")
    assert fastcast.verify(out, progress=False).ok


def test_cli_says_the_depth_and_verify_tells_copies_apart(llama: Path, tmp_path: Path) -> None:
    """The summary shows the new depth; two copies of base layer 1 (output layers 1 and 3,
    each with its own update) swapped fail verify."""
    adapter = make_adapter(llama, tmp_path / "ad", r=4, layer_replication=MAP,
                           target_modules=["q_proj"])  # fmt: skip
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out, "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    assert "config.json: num_hidden_layers: 4 -> 6" in done.stdout, done.stdout
    shown = cli("inspect", adapter)
    assert "on 6 modules of a model of base layers [[0, 3], [1, 4]] (layer_replication)" in (
        shown.stdout
    ), shown.stdout
    shard = out / "model.safetensors"
    state = safetensors_torch.load_file(str(shard))
    one, three = (f"model.layers.{j}.self_attn.q_proj.weight" for j in (1, 3))
    state[one], state[three] = state[three], state[one]
    safetensors_torch.save_file(state, str(shard), metadata={"format": "pt"})
    done = cli("verify", out)
    assert done.returncode == 1 and f"mismatch: {one}" in done.stdout, done.stdout


def test_layers_left_out_and_layer_types_follow(tmp_path: Path) -> None:
    """A map that repeats gpt-oss's (sliding, full) pair and leaves nothing out of it,
    its experts adapted too (``target_parameters``): ``layer_types`` follows the copies
    and the logits are PEFT's; a map that leaves base layer 1 out drops it."""
    base = build_moe(tmp_path / "base", "gpt_oss")
    adapter = make_adapter(base, tmp_path / "ad", r=4, layer_replication=[[0, 2], [0, 2]],
                           target_modules=["q_proj"],
                           target_parameters=["mlp.experts.down_proj"])  # fmt: skip
    out = tmp_path / "out"
    report = fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == 2 * 4
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    types = json.loads((base / "config.json").read_text())["layer_types"]
    assert config["layer_types"] == types + types
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model = peft_model(base, adapter)
    # PEFT's replicate_layers leaves layer_types at the base's depth, so its own model
    # cannot run: given the copies' types (each copy's attention is its source's), it does
    model.base_model.model.config.layer_types = types + types
    with torch.no_grad():
        got = merged(TOKENS).logits
        want = model(TOKENS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert fastcast.verify(out, progress=False).ok

    first = make_adapter(base, tmp_path / "first", r=4, layer_replication=[[0, 1]],
                         target_modules=["q_proj"])  # fmt: skip
    out = tmp_path / "first-out"
    fastcast.convert(base, output=out, merge_lora=first, progress=False)
    assert not any(n.startswith("model.layers.1.") for n in output(out))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["layer_types"] == types[:1]
    assert fastcast.verify(out, progress=False).ok


REFUSALS = {
    "past the base's layers": ({"layer_replication": [[0, 3], [2, 5]]},
                               "reaches past the base's 4 layers"),
    "not a map": ({"layer_replication": [[3, 1]]}, "is not a list of [start, end) layer"),
    "a string": ({"layer_replication": "0-4"}, "is not a list of [start, end) layer"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_in_one_line_nothing_written(llama: Path, tmp_path: Path, case: str) -> None:
    change, message = REFUSALS[case]
    adapter = make_adapter(llama, tmp_path / "ad0", r=4, layer_replication=MAP,
                           target_modules=["q_proj"])  # fmt: skip
    adapter = edited(adapter, tmp_path / "ad", config=change)
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("fastcast: error:") and message in lines[0], lines[0]
    assert not out.exists()


def test_quantizing_or_a_quantized_base_is_refused(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", r=4, layer_replication=MAP,
                           target_modules=["q_proj"])  # fmt: skip
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out, "--quantize", "fp8-channel")
    assert done.returncode == 1 and "layer_replication with --quantize" in done.stderr
    assert not out.exists()

    quantized = require("quantized")
    model = quantized.ALL["deepseek-fp8"](tmp_path / "q")
    edited(adapter, tmp_path / "q-ad", config={"layer_replication": [[0, 1], [0, 1]]})
    done = cli("convert", model.path, "--merge-lora", tmp_path / "q-ad", "-o", out,
               "--dequantize", "--dtype", "bf16")  # fmt: skip
    assert done.returncode == 1 and "layer_replication into a quantized base" in done.stderr
    assert not out.exists()


def test_remap_reads_each_index_as_written(tmp_path: Path) -> None:
    """A hostile spelling of the layer index (zero-padded): each tensor keeps the rest
    of its own name after whatever digits its index has, and its own bytes."""
    from fastcast._plan.layers import Replication
    from fastcast._source.entries import TensorEntry

    names = ["embed.weight", "model.layers.00.q.weight", "model.layers.01.q.weight", "norm.weight"]
    entries = [
        TensorEntry(n, "F32", (2,), tmp_path, (8 * i, 8 * i + 8)) for i, n in enumerate(names)
    ]
    got = Replication("model.layers.", (1, 0, 1), 2).remap(entries)
    assert [(e.name, e.offsets) for e in got] == [
        ("embed.weight", (0, 8)),
        ("model.layers.0.q.weight", (16, 24)),
        ("model.layers.1.q.weight", (8, 16)),
        ("model.layers.2.q.weight", (16, 24)),
        ("norm.weight", (24, 32)),
    ]
