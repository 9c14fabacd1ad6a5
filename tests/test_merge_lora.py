"""``--merge-lora``: adapters made by PEFT itself, merged by fastcast, held to PEFT's own
``merge_and_unload()`` on the base loaded in float32 (the contract of issue 29):

- bf16/fp16 outputs: every element within 1 ulp of PEFT's fp32 merge cast to the
  output dtype (the tests say how many differ at all);
- fp32 outputs: no element further from the exact (float64) merge than PEFT's own is,
  give or take one fp32 ulp (fastcast rounds once; PEFT's GEMM and norm round on the
  way: they differ from each other by a few ulp where W and the update nearly cancel);
- tensors no adapter touches: bit for bit torch's cast; the output loads with
  transformers with no arguments, its logits PEFT's merged model's; ``verify`` passes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fastcast
from adapters import build_gpt2, make_adapter, peft_logits, peft_merged
from commands import cli
from conftest import require
from models import build_llama

torch = require("torch")
require("peft")
safetensors_torch = require("safetensors.torch")

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def ordered(t: Any) -> Any:
    """Each float's bits as an integer that orders like the float (ulp distances)."""
    width = {torch.float32: torch.int32}.get(t.dtype, torch.int16)
    i = t.view(width).long()
    sign = 1 << (8 * t.element_size() - 1)
    return torch.where(i < 0, -(i + sign), i)


def ulp_distance(a: Any, b: Any) -> Any:
    return (ordered(a) - ordered(b)).abs()


def output(out: Path) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors |= safetensors_torch.load_file(f)
    return tensors


def merged_names(adapter: Path) -> set[str]:
    """The base weights the adapter's LoRA modules update."""
    names = set()
    for k in safetensors_torch.load_file(adapter / "adapter_model.safetensors"):
        k = k.removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_embedding_A"):
            if k.endswith(part):
                names.add(k.removesuffix(part) + ".weight")
    return names


def check_low_precision(got: dict[str, Any], ref: dict[str, Any], merged: set[str]) -> int:
    """Every merged element within 1 ulp of PEFT's fp32 merge cast to its dtype, every
    other tensor torch's cast of the base; returns how many merged elements differ."""
    differing = 0
    assert merged <= set(got)
    assert merged <= set(ref)
    for name, g in got.items():
        if name not in ref:  # transformers fuses DeepSeek's experts: verify checked them
            continue
        want = ref[name].to(g.dtype)
        if name not in merged:
            assert torch.equal(g, want), name
            continue
        d = ulp_distance(g, want)
        assert int(d.max()) <= 1, f"{name}: {int(d.max())} ulp from PEFT's merge"
        differing += int((d > 0).sum())
    return differing


def convert_merged(base: Path, adapter: Path, out: Path, dtype: str | None) -> dict[str, Any]:
    report = fastcast.convert(base, dtype, output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == len(merged_names(adapter))
    assert fastcast.verify(out, progress=False).ok
    return output(out)


def check_logits(
    base: Path, adapter: Path, out: Path, dtype: str, vocab: int | None = None
) -> None:
    """The merged output, loaded by transformers with no arguments, gives PEFT's merged
    model's logits (both in ``dtype``)."""
    transformers = require("transformers")
    tokens = torch.arange(1, 17).view(1, -1)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = model(tokens).logits.float()
    want = peft_logits(base, adapter, dtype, tokens, vocab)
    tol = 1e-5 if dtype == "float32" else 5e-2
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("llama") / "base", tie_word_embeddings=False)


def test_lora_on_attention_and_mlp_to_bf16(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", r=8, lora_alpha=16,
                           target_modules=LLAMA_LINEARS)  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", "bf16")
    differing = check_low_precision(got, peft_merged(llama, adapter), merged_names(adapter))
    print(f"bf16: {differing} merged elements 1 ulp from PEFT's, none further")
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["dtype"] == "bfloat16"
    check_logits(llama, adapter, tmp_path / "out", "bfloat16")


def exact_merge(base: Path, adapter: Path, name: str, scale: float, dora: bool) -> Any:
    """The merge of ``name`` in float64 (the nn.Linear orientation), and the bound an fp32
    merge's error stays within: ``(r + 4) · eps32 · (|W| + |s| · |B| @ |A|)``, times the
    DoRA factor, plus a few ulp of the factor and one of the result."""
    w = safetensors_torch.load_file(base / "model.safetensors")[name].double()
    a_sd = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    module = "base_model.model." + name.removesuffix(".weight")
    a, b = a_sd[f"{module}.lora_A.weight"].double(), a_sd[f"{module}.lora_B.weight"].double()
    s = float(torch.tensor(scale, dtype=torch.float32))
    v = w + s * (b @ a)
    eps = 2.0**-24
    bound = (a.shape[0] + 4) * eps * (w.abs() + s * (b.abs() @ a.abs()))
    if dora:
        m = a_sd[f"{module}.lora_magnitude_vector"].double()
        f = (m / v.norm(dim=1)).view(-1, 1)
        v, bound = v * f, bound * f.abs() + 8 * eps * (v * f).abs()
    one_ulp = (v.float().nextafter(torch.tensor(math.inf)) - v.float()).double().abs()
    return v, bound + one_ulp


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fp32_base_kept_in_fp32_within_fp32_rounding(
    llama: Path, tmp_path: Path, dora: bool
) -> None:
    """Without a dtype an fp32 base stays fp32. Where W and the update nearly cancel an
    fp32 merge (PEFT's, fastcast's) is many ulp from the exact one, so both are held to
    the bound of fp32 rounding; and fastcast's is no less exact than PEFT's on average."""
    adapter = make_adapter(llama, tmp_path / "ad", r=8, lora_alpha=16, use_dora=dora,
                           target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", None)
    ref = peft_merged(llama, adapter)
    differing = worst = total = 0
    for name in merged_names(adapter):
        exact, bound = exact_merge(llama, adapter, name, 2.0, dora)
        ours, peft = got[name], ref[name]
        assert ours.dtype == torch.float32
        assert bool(((peft.double() - exact).abs() <= bound).all()), f"{name}: the bound"
        assert bool(((ours.double() - exact).abs() <= bound).all()), name
        ours_error = (ours.double() - exact).abs().sum()
        assert ours_error <= (peft.double() - exact).abs().sum() * 1.01, name
        d = ulp_distance(ours, peft)
        differing, worst = differing + int((d > 0).sum()), max(worst, int(d.max()))
        total += ours.numel()
    print(f"fp32 {'DoRA' if dora else 'LoRA'}: {differing} of {total} merged elements "
          f"differ from PEFT's, by at most {worst} ulp; all {total} within the fp32 "
          "rounding bound, as PEFT's")  # fmt: skip
    for name in set(got) - merged_names(adapter):
        assert torch.equal(got[name], ref[name]), name
    check_logits(llama, adapter, tmp_path / "out", "float32")


def test_rslora_with_rank_and_alpha_patterns(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(
        llama, tmp_path / "ad", r=8, lora_alpha=16, use_rslora=True,
        target_modules=LLAMA_LINEARS,
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 16},
        alpha_pattern={"v_proj": 3, "down_proj": 40},
    )  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", "bf16")
    check_low_precision(got, peft_merged(llama, adapter), merged_names(adapter))
    ranks = {k: v.shape[0] for k, v in safetensors_torch.load_file(
        adapter / "adapter_model.safetensors").items() if "lora_A" in k}  # fmt: skip
    assert {ranks[k] for k in ranks if "q_proj" in k} == {4}
    assert {ranks[k] for k in ranks if "layers.1.mlp.down_proj" in k} == {16}


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are [in, out]: the update is transposed, square c_proj
    included (decided by the module type, not the shape)."""
    base = build_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"])  # fmt: skip
    got = convert_merged(base, adapter, tmp_path / "out", "bf16")
    ref = peft_merged(base, adapter)
    got.setdefault("lm_head.weight", got["transformer.wte.weight"])  # tied in the file
    check_low_precision(got, ref, merged_names(adapter))
    check_logits(base, adapter, tmp_path / "out", "bfloat16")


def test_dora_with_embedding_lora(llama: Path, tmp_path: Path) -> None:
    """DoRA on Linear layers (norm per row) and on the embedding (per column)."""
    adapter = make_adapter(llama, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["embed_tokens", "q_proj", "o_proj"])  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", "bf16")
    ref = peft_merged(llama, adapter)
    check_low_precision(got, ref, merged_names(adapter) | {"model.embed_tokens.weight"})
    check_logits(llama, adapter, tmp_path / "out", "bfloat16")


def test_lora_bias_is_added_to_the_base_bias(tmp_path: Path) -> None:
    """``lora_bias=True``: each targeted layer's bias becomes ``b + scale · lora_B.bias``
    (PEFT's merge), in fp32 and rounded once."""
    base = build_llama(tmp_path / "base", tie_word_embeddings=False, attention_bias=True)
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, lora_bias=True,
                           target_modules=["q_proj", "v_proj", "o_proj"])  # fmt: skip
    lora = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    biases = {k.removeprefix("base_model.model.").replace(".lora_B.bias", ".bias")
              for k in lora if k.endswith(".lora_B.bias")}  # fmt: skip
    assert len(biases) == 6 and all(
        bool(lora[f"base_model.model.{b.removesuffix('.bias')}.lora_B.bias"].any()) for b in biases
    )
    out = tmp_path / "out"
    report = fastcast.convert(base, "bf16", output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == len(merged_names(adapter)) + len(biases)
    assert fastcast.verify(out, progress=False).ok
    ref = peft_merged(base, adapter)
    plain = safetensors_torch.load_file(base / "model.safetensors")
    assert all(not torch.equal(ref[b], plain[b]) for b in biases), "a real change"
    check_low_precision(output(out), ref, merged_names(adapter) | biases)
    check_logits(base, adapter, out, "bfloat16")
    f32 = tmp_path / "f32"
    fastcast.convert(base, output=f32, merge_lora=adapter, progress=False)
    got = output(f32)
    for b in biases:  # the exact sum rounded once; PEFT's rounds twice
        assert int(ulp_distance(got[b], ref[b]).max()) <= 1, b
    shard = next(f32.glob("*.safetensors"))  # a bias left unmerged fails verify
    state = safetensors_torch.load_file(str(shard))
    forgotten = sorted(biases)[0]
    state[forgotten] = plain[forgotten]
    safetensors_torch.save_file(state, str(shard), metadata={"format": "pt"})
    done = cli("verify", f32)
    assert done.returncode == 1 and f"mismatch: {forgotten}" in done.stdout, done.stdout


def test_lora_bias_into_a_layer_without_one_is_refused(llama: Path, tmp_path: Path) -> None:
    """PEFT cannot merge a trained bias into a layer without a bias: refused, naming it."""
    biased = build_llama(tmp_path / "biased", tie_word_embeddings=False, attention_bias=True)
    adapter = make_adapter(biased, tmp_path / "ad", r=4, lora_bias=True,
                           target_modules=["q_proj"])  # fmt: skip
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out, "--dtype", "bf16")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "has a trained bias (lora_bias) but the base has no " in done.stderr, done.stderr
    assert "model.layers.0.self_attn.q_proj.bias" in done.stderr and not out.exists()


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_replace_their_rows(tmp_path: Path, tied: bool) -> None:
    """``trainable_token_indices``: the embedding's rows at those indices become the
    adapter's (PEFT's ``index_copy``), bit for bit PEFT's fp32 merge cast; the rest cast
    as they were. A tied head follows through the tie (the file holds one tensor), the
    config form a list (the input embedding) or a dict by module name."""
    base = build_llama(tmp_path / "base", tie_word_embeddings=tied)
    indices = [1, 5, 9, 127]
    adapter = make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"],
                           trainable_token_indices={"embed_tokens": indices} if tied
                           else indices)  # fmt: skip
    out = tmp_path / "out"
    report = fastcast.convert(base, "bf16", output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == len(merged_names(adapter)) + 1
    assert fastcast.verify(out, progress=False).ok
    ref = peft_merged(base, adapter)
    got = output(out)
    embed = "model.embed_tokens.weight"
    plain = safetensors_torch.load_file(base / "model.safetensors")[embed]
    assert not torch.equal(ref[embed][indices], plain[indices]), "a real change"
    assert torch.equal(ref[embed][2], plain[2])
    assert torch.equal(got[embed], ref[embed].to(torch.bfloat16))
    check_low_precision(got, ref, merged_names(adapter))
    check_logits(base, adapter, out, "bfloat16")
    said = cli("inspect", adapter)
    assert "trainable tokens: model.embed_tokens (4)" in said.stdout, said.stdout
    shard = out / "model.safetensors"  # the rows left as they were fail verify
    state = safetensors_torch.load_file(str(shard))
    state[embed] = plain.to(torch.bfloat16)
    safetensors_torch.save_file(state, str(shard), metadata={"format": "pt"})
    done = cli("verify", out)
    assert done.returncode == 1 and f"mismatch: {embed}" in done.stdout, done.stdout
    assert "index_copy" in done.stdout


TOKEN_REFUSALS = {
    "an index past the vocabulary": ({"trainable_token_indices": [1, 5, 9, 128]},
                                     "do not fit the base's model.embed_tokens.weight"),
    "an index twice": ({"trainable_token_indices": [1, 5, 5, 9]}, "no list of distinct"),
    "fewer indices than rows": ({"trainable_token_indices": [1, 5]},
                                "not the 2 float rows trainable_token_indices names"),
    "a module the dict does not name": ({"trainable_token_indices": {"lm_head": [1, 2, 3, 4]}},
                                        "gives model.embed_tokens no list"),
    "rows without indices": ({"trainable_token_indices": None}, "one without the other"),
}  # fmt: skip


@pytest.mark.parametrize("case", TOKEN_REFUSALS)
def test_trainable_tokens_that_do_not_fit_are_refused(
    llama: Path, tmp_path: Path, case: str
) -> None:
    config, message = TOKEN_REFUSALS[case]
    adapter = make_adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj"],
                           trainable_token_indices=[1, 5, 9, 127])  # fmt: skip
    bad = edited(adapter, tmp_path / "bad", config=config)
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", bad, "-o", out, "--dtype", "bf16")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not out.exists()


def test_modules_to_save_replace_the_base(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", r=4, lora_alpha=8,
                           target_modules=["q_proj"], modules_to_save=["lm_head"])  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", "bf16")
    ref = peft_merged(llama, adapter)
    base = safetensors_torch.load_file(llama / "model.safetensors")
    assert not torch.equal(ref["lm_head.weight"], base["lm_head.weight"])  # a real change
    check_low_precision(got, ref, merged_names(adapter))


def test_resized_vocabulary_follows_into_the_config(llama: Path, tmp_path: Path) -> None:
    """A fine-tune that added tokens: its embeddings and head, saved whole, replace the
    base's at their new size, a LoRA on the embedding added to the new one; config.json's
    vocab_size follows, and transformers loads the output with no arguments."""
    adapter = make_adapter(llama, tmp_path / "ad", vocab=136, r=4, lora_alpha=8,
                           target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"])  # fmt: skip
    got = convert_merged(llama, adapter, tmp_path / "out", "bf16")
    ref = peft_merged(llama, adapter, vocab=136)
    assert got["model.embed_tokens.weight"].shape == (136, 64)
    assert got["lm_head.weight"].shape == (136, 64)
    check_low_precision(got, ref, merged_names(adapter))
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["vocab_size"] == 136
    check_logits(llama, adapter, tmp_path / "out", "bfloat16", vocab=136)


def test_tied_head_trained_apart_is_added_untied(tmp_path: Path) -> None:
    """A base that ties lm_head to the embeddings (no lm_head in its file) and an adapter
    that trained lm_head (modules_to_save): the output holds it, untied in config.json,
    else transformers would tie it back and drop the training."""
    base = build_llama(tmp_path / "tied")
    assert "lm_head.weight" not in safetensors_torch.load_file(base / "model.safetensors")
    adapter = make_adapter(base, tmp_path / "ad", r=4, target_modules=["v_proj"],
                           modules_to_save=["lm_head"])  # fmt: skip
    got = convert_merged(base, adapter, tmp_path / "out", None)
    ref = peft_merged(base, adapter)
    assert not torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    check_low_precision(got, ref, merged_names(adapter))
    assert got["lm_head.weight"].dtype == torch.float32
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["tie_word_embeddings"] is False
    check_logits(base, adapter, tmp_path / "out", "float32")


def test_bf16_base_stays_bf16_and_fp32_base_with_bf16_adapter(llama: Path, tmp_path: Path) -> None:
    """Never fp32 for a bf16 base; an fp32 base merged with a bf16 adapter to bf16."""
    bf16_base = build_llama(tmp_path / "bf16", dtype="bfloat16", tie_word_embeddings=False)
    adapter = make_adapter(bf16_base, tmp_path / "ad", target_modules=["q_proj", "up_proj"],
                           adapter_dtype="bfloat16")  # fmt: skip
    got = convert_merged(bf16_base, adapter, tmp_path / "out", None)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    check_low_precision(got, peft_merged(bf16_base, adapter), merged_names(adapter))
    adapter16 = make_adapter(llama, tmp_path / "ad16", target_modules=["k_proj"],
                             adapter_dtype="bfloat16")  # fmt: skip
    got = convert_merged(llama, adapter16, tmp_path / "out16", "bf16")
    check_low_precision(got, peft_merged(llama, adapter16), merged_names(adapter16))


def test_adapter_saved_as_bin_and_layers_to_transform(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", target_modules=["q_proj", "down_proj"],
                           layers_to_transform=[1], safe_serialization=False)  # fmt: skip
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    out = tmp_path / "out"
    report = fastcast.convert(llama, "bf16", output=out, merge_lora=adapter, progress=False)
    assert report.tensors_merged == 2  # layer 1 only
    assert fastcast.verify(out, progress=False).ok
    got, ref = output(out), peft_merged(llama, adapter)
    merged = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    check_low_precision(got, ref, merged)


def test_cli_merges_and_records_the_adapter(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", target_modules=["q_proj"])
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out, "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    assert "merged with the adapter" in done.stdout
    record = json.loads((out / "fastcast.json").read_text())
    assert record["merge_lora"]["path"] == str(adapter)
    assert len(record["merge_lora"]["sha256"]) == 64
    verified = cli("verify", out)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "2 merged weights: held to PEFT's merge within fp32 rounding" in verified.stdout
    shown = cli("inspect", adapter)
    assert "adapter: LoRA on 2 modules, rank 8, alpha 8" in shown.stdout, shown.stdout
    assert f"merged with {adapter}" in cli("inspect", out).stdout
    # verify re-checks the merge: an adapter edited since no longer matches the output
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 64}))
    assert not fastcast.verify(out, progress=False).ok


def edited(adapter: Path, dest: Path, *, config: dict[str, Any] | None = None,
           tensors: Any = None) -> Path:  # fmt: skip
    """A copy of ``adapter`` with its config updated and its tensors rewritten."""
    shutil.copytree(adapter, dest)
    if config is not None:
        c = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps(c | config))
    if tensors is not None:
        f = dest / "adapter_model.safetensors"
        safetensors_torch.save_file(tensors(safetensors_torch.load_file(f)), f)
    return dest


def renamed(sd: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return {k.replace(old, new): v for k, v in sd.items()}


def sliced(sd: dict[str, Any], part: str) -> dict[str, Any]:
    """The adapter with every ``part`` one column short."""
    return {k: (v[:, :-1].contiguous() if part in k else v) for k, v in sd.items()}


REFUSALS = {
    "another model": (
        {"tensors": lambda sd: renamed(sd, "q_proj", "query")},
        "model.layers.0.self_attn.query.weight, which the base does not have",
    ),
    "another size": (
        {"tensors": lambda sd: sliced(sd, "lora_A")},
        "do not fit the base's",
    ),
    "rank disagrees with the config": ({"config": {"r": 4}}, "has rank 8 but the config says 4"),
    "A and B ranks disagree": (
        {"tensors": lambda sd: sliced(sd, "lora_B")},
        "do not have one rank",
    ),
    "replacement of another width": (
        {"tensors": lambda sd: sd | {"base_model.model.lm_head.weight": torch.ones(128, 63)}},
        "lm_head.weight is [128, 63] in the adapter but [128, 64] in the base",
    ),
    "IA3": ({"config": {"peft_type": "IA3"}}, "a IA3 adapter"),
    "lora_bias flag without biases": (
        {"config": {"lora_bias": True}},
        "module model.layers.0.self_attn.q_proj has no lora_B.bias but lora_bias is True",
    ),
    "unknown tensor": (
        {"tensors": lambda sd: sd | {"base_model.model.extra.lora_C": torch.ones(2)}},
        "tensors a LoRA merge does not know: base_model.model.extra.lora_C",
    ),
    "DoRA flag without magnitudes": ({"config": {"use_dora": True}}, "use_dora is True"),
    "lora_bias with DoRA": (
        {"config": {"use_dora": True, "lora_bias": True}},
        "lora_bias with DoRA (use_dora), which PEFT does not support either",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_in_one_line_nothing_written(llama: Path, tmp_path: Path, case: str) -> None:
    change, message = REFUSALS[case]
    adapter = make_adapter(llama, tmp_path / "ad", r=8, target_modules=["q_proj"])
    bad = edited(adapter, tmp_path / "bad", **change)
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", bad, "-o", out, "--dtype", "bf16")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcast: error:"), done.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_refuses_a_missing_adapter_and_kept_quantization(llama: Path, tmp_path: Path) -> None:
    done = cli("convert", llama, "--merge-lora", tmp_path / "nowhere", "-o", tmp_path / "o")
    assert done.returncode == 1 and "not an adapter folder" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli("convert", llama, "--merge-lora", empty, "-o", tmp_path / "o")
    assert done.returncode == 1 and "no adapter_config.json" in done.stderr
    done = cli("convert", llama, "--merge-lora", empty, "--keep-quantized", "--dtype", "bf16")
    assert done.returncode == 1 and "quantization cannot be kept" in done.stderr
    done = cli("convert", llama, "--merge-lora", empty, "--quantize", "fp8-channel")
    assert done.returncode == 1 and "no adapter_config.json" in done.stderr
    assert not (tmp_path / "o").exists()


def truncated(adapter: Path) -> None:
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def bad_json(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text("{not json")


def dangling_weights(adapter: Path) -> None:
    f = adapter / "adapter_model.safetensors"
    f.unlink()
    f.symlink_to(adapter / "gone.safetensors")


def header_past_the_end(adapter: Path) -> None:
    """A header whose last tensor's offsets run past the file (sizes kept)."""
    f = adapter / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 4096, end + 4096]
    text = json.dumps(header).encode().ljust(n)
    f.write_bytes(bytes(data[:8]) + text[:n] + bytes(data[8 + n :]))


HOSTILE = {
    "truncated weights": (truncated, "adapter_model.safetensors"),
    "config not JSON": (bad_json, "adapter_config.json"),
    "weights a dangling link": (dangling_weights, "adapter_model.safetensors"),
    "offsets past the end": (header_past_the_end, "adapter_model.safetensors"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_adapters_one_line_input_untouched(llama: Path, tmp_path: Path, case: str) -> None:
    damage, names = HOSTILE[case]
    adapter = make_adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj"])
    damage(adapter)
    before = {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    out = tmp_path / "out"
    done = cli("convert", llama, "--merge-lora", adapter, "-o", out, "--dtype", "bf16")
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcast: error:"), done.stderr
    assert names in lines[0], lines[0]
    assert not out.exists()
    assert {p: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before
    file_given = cli("convert", llama, "--merge-lora", adapter / "adapter_config.json")
    assert file_given.returncode == 1 and "not an adapter folder" in file_given.stderr


#: A quantized base of each family: the adapter is merged into its weights dequantized.
QUANTIZED_BASES = ["deepseek-fp8", "ct-fp8-channel", "bnb-nf4-dq", "bnb-int8", "gptq-v1-desc-act",
                   "awq"]  # fmt: skip


@pytest.mark.parametrize("name", QUANTIZED_BASES)
def test_quantized_base_dequantized_in_fp32_then_merged(tmp_path: Path, name: str) -> None:
    """A QLoRA-style merge: each quantized weight dequantized exactly in fp32 (the format's
    reference, not PEFT's 4-bit round trip), the update added, rounded once. Oracle: PEFT's
    merge into the base dequantized to fp32 (``--dequantize --dtype fp32``, itself held
    to each format's library elsewhere), cast to bf16."""
    quantized = require("quantized")
    model = quantized.ALL[name](tmp_path / "q")
    plain = tmp_path / "plain"
    fastcast.convert(model.path, "fp32", output=plain, dequantize=True, progress=False)
    # DeepSeek-V3's routed experts are fused parameters in transformers: not targeted
    targets = ["kv_b_proj", "o_proj"] if name == "deepseek-fp8" else ["q_proj", "down_proj"]
    adapter = make_adapter(plain, tmp_path / "ad", r=4, lora_alpha=8,
                           target_modules=[*targets, "embed_tokens"])  # fmt: skip
    out = tmp_path / "out"
    refused = cli("convert", model.path, "--merge-lora", adapter, "-o", out, "--dtype", "bf16")
    assert refused.returncode == 1 and "--dequantize" in refused.stderr, refused.stderr
    report = fastcast.convert(model.path, "bf16", output=out, dequantize=True,
                              merge_lora=adapter, progress=False)  # fmt: skip
    assert report.tensors_merged == len(merged_names(adapter))
    assert fastcast.verify(out, progress=False).ok
    check_low_precision(output(out), peft_merged(plain, adapter), merged_names(adapter))


def test_the_adapters_tokenizer_files_win(llama: Path, tmp_path: Path) -> None:
    """A fine-tune that changed the tokenizer (added tokens, a chat template) saved it
    beside the adapter: the merged output holds the adapter's, not the base's."""
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (base / "special_tokens_map.json").write_text('{"eos_token": "</s>"}\n')
    adapter = make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    (adapter / "tokenizer_config.json").write_text('{"model_max_length": 64, "chat": 1}\n')
    (adapter / "chat_template.jinja").write_text("{{ messages }}\n")
    out = tmp_path / "out"
    report = fastcast.convert(base, output=out, merge_lora=adapter, progress=False)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64, "chat": 1}\n'
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}\n"
    assert (out / "special_tokens_map.json").read_text() == '{"eos_token": "</s>"}\n'
    assert {"tokenizer_config.json", "chat_template.jinja"} <= set(report.copied)
    assert fastcast.verify(out, progress=False).ok
    assert (base / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'


def test_an_adapter_given_as_a_cached_repo_id(llama: Path, tmp_path: Path) -> None:
    """``--merge-lora org/name``: the adapter's snapshot in the local Hugging Face cache
    (files linked to blobs, as huggingface_hub lays them out); never downloaded."""
    made = make_adapter(llama, tmp_path / "made", r=4, target_modules=["q_proj"])
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in made.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fastcast.cli", "convert", str(llama), "--merge-lora",
         "acme/tiny-lora", "-o", str(out), "--dtype", "bf16"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "fastcast.json").read_text())
    assert record["merge_lora"]["path"] == "acme/tiny-lora"
    assert fastcast.verify(out, progress=False).ok
    missing = subprocess.run(
        [sys.executable, "-m", "fastcast.cli", "convert", str(llama), "--merge-lora",
         "acme/absent", "-o", str(tmp_path / "o2")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert missing.returncode == 1 and "fastcast never downloads" in missing.stderr


def test_a_jobs_file_merges_each_models_adapter(llama: Path, tmp_path: Path) -> None:
    """A fleet of fine-tunes of one base: a jobs file gives each entry its adapter; each
    output is the one a single run writes."""
    ad1 = make_adapter(llama, tmp_path / "ad1", r=4, target_modules=["q_proj"], seed=1)
    ad2 = make_adapter(llama, tmp_path / "ad2", r=8, target_modules=["v_proj"], seed=2)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        f'dtype = "bf16"\n\n[[model]]\npath = "{llama}"\nmerge_lora = "{ad1}"\n'
        f'output = "{tmp_path / "one"}"\n\n[[model]]\npath = "{llama}"\n'
        f'merge_lora = "{ad2}"\noutput = "{tmp_path / "two"}"\n'
    )
    done = cli("convert", "--jobs", jobs)
    assert done.returncode == 0, done.stderr
    for adapter, out in ((ad1, "one"), (ad2, "two")):
        alone = tmp_path / f"alone-{out}"
        fastcast.convert(llama, "bf16", output=alone, merge_lora=adapter, progress=False)
        assert (tmp_path / out / "model.safetensors").read_bytes() == (
            alone / "model.safetensors"
        ).read_bytes()
        record = json.loads((tmp_path / out / "fastcast.json").read_text())
        assert record["merge_lora"]["path"] == str(adapter)
    one, two = (output(tmp_path / n) for n in ("one", "two"))
    assert not torch.equal(one["model.layers.0.self_attn.q_proj.weight"],
                           two["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_resume_knows_the_adapter(llama: Path, tmp_path: Path) -> None:
    """A finished merge resumed with the same adapter has nothing to do; with another
    adapter (another file, same shapes) the output is not taken for its conversion."""
    ad1 = make_adapter(llama, tmp_path / "ad1", r=4, target_modules=["q_proj"], seed=1)
    ad2 = make_adapter(llama, tmp_path / "ad2", r=4, target_modules=["q_proj"], seed=2)
    out = tmp_path / "out"
    fastcast.convert(llama, "bf16", output=out, merge_lora=ad1, progress=False)
    again = fastcast.convert(llama, "bf16", output=out, merge_lora=ad1, resume=True,
                             progress=False)  # fmt: skip
    assert again.already_done
    before = (out / "model.safetensors").read_bytes()
    other = cli("convert", llama, "--merge-lora", ad2, "-o", out, "-d", "bf16", "--resume")
    assert other.returncode == 1, other.stdout
    assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_the_merge_command_is_convert_merge_lora(llama: Path, tmp_path: Path) -> None:
    adapter = make_adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj"])
    merged = cli("merge", llama, adapter, "-o", tmp_path / "m", "--dtype", "bf16")
    assert merged.returncode == 0, merged.stderr
    assert "merged with the adapter" in merged.stdout
    converted = cli("convert", llama, "--merge-lora", adapter, "-o", tmp_path / "c", "-d", "bf16")
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "m/model.safetensors").read_bytes() == (
        tmp_path / "c/model.safetensors"
    ).read_bytes()
    helped = cli("merge", "--help")
    assert helped.returncode == 0 and "--merge-lora" in helped.stdout
    missing = cli("merge", llama, tmp_path / "nowhere", "-o", tmp_path / "x")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_a_lone_weights_file_and_a_linked_adapter(tmp_path: Path) -> None:
    """The base given as its one .safetensors file (its folder's config.json still says
    GPT-2, so the square c_proj is still transposed) and the adapter through a link."""
    base = build_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj"])  # fmt: skip
    link = tmp_path / "linked-adapter"
    link.symlink_to(adapter, target_is_directory=True)
    out = tmp_path / "out"
    done = cli("merge", base / "model.safetensors", link, "-o", out, "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    got = output(out)
    got.setdefault("lm_head.weight", got["transformer.wte.weight"])
    check_low_precision(got, peft_merged(base, adapter), merged_names(adapter))
    assert fastcast.verify(out, progress=False).ok


def test_a_name_two_components_hold_is_refused(llama: Path, tmp_path: Path) -> None:
    """A pipeline whose components share tensor names (two text encoders): which one an
    adapter was trained on cannot be told, so nothing is merged rather than a guess."""
    base = tmp_path / "pipeline"
    shutil.copytree(llama, base)
    shutil.copytree(llama, base / "text_encoder_2")
    adapter = make_adapter(llama, tmp_path / "ad", r=4, target_modules=["q_proj"])
    done = cli("merge", base, adapter, "-o", tmp_path / "out")
    assert done.returncode == 1
    assert "which weight sets 'model' and 'text_encoder_2/model' of the base both hold" in (
        done.stderr
    ), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def tensors_of(out: Path) -> dict[str, Any]:
    """Every tensor of an output's shards, by name."""
    st = require("safetensors.torch")
    found: dict[str, Any] = {}
    for f in sorted(out.glob("*.safetensors")):
        found.update(st.load_file(str(f)))
    return found


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 Llama whose Linears fill fp8's 128x128 blocks (some partially)."""
    return build_llama(tmp_path_factory.mktemp("wide") / "base", dtype="bfloat16",
                       hidden_size=256, intermediate_size=384,
                       tie_word_embeddings=False)  # fmt: skip


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
def test_merge_then_quantize_is_the_f32_merge_quantized(
    wide_llama: Path, tmp_path: Path, scheme: str
) -> None:
    """``--merge-lora A --quantize fp8`` in one pass writes, bit for bit, the values and
    scales ``--quantize fp8`` writes from the f32 output of ``--merge-lora A --dtype
    fp32``; verify re-checks them against PEFT's merge math, the rest cast as
    ``--quantize`` leaves it."""
    adapter = make_adapter(wide_llama, tmp_path / "ad", r=8, lora_alpha=16,
                           target_modules=LLAMA_LINEARS)  # fmt: skip
    one = tmp_path / "one"
    report = fastcast.convert(wide_llama, output=one, merge_lora=adapter, quantize=scheme,
                              progress=False)  # fmt: skip
    f32 = tmp_path / "f32"
    fastcast.convert(wide_llama, "fp32", output=f32, merge_lora=adapter, progress=False)
    two = tmp_path / "two"
    fastcast.convert(f32, output=two, quantize=scheme, progress=False)
    got, want = tensors_of(one), tensors_of(two)
    quantized = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantized) == len(merged_names(adapter)) == report.tensors_quantized
    assert report.tensors_merged_quantized == len(quantized) and report.tensors_merged == 0
    for name in quantized:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
        scale = next(n for n in got if n.startswith(name) and n != name)
        assert torch.equal(got[scale], want[scale]), scale
    base = tensors_of(wide_llama)
    for name in set(got) - set(quantized) - {n for n in got if "scale" in n}:
        assert torch.equal(got[name], base[name]), f"{name} kept as the base has it"
    config = json.loads((one / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] in ("fp8", "compressed-tensors")
    record = json.loads((one / "fastcast.json").read_text())
    assert record["merge_lora"]["path"] == str(adapter)
    assert fastcast.verify(one, progress=False).ok


def test_merge_command_quantizes_too(wide_llama: Path, tmp_path: Path) -> None:
    """``fastcast merge BASE ADAPTER --quantize fp8`` is ``convert --merge-lora``'s."""
    adapter = make_adapter(wide_llama, tmp_path / "ad", r=4, lora_alpha=8,
                           target_modules=["q_proj", "down_proj"])  # fmt: skip
    out = tmp_path / "merged-fp8"
    done = cli("merge", wide_llama, adapter, "--quantize", "fp8", "-o", out)
    assert done.returncode == 0, done.stderr
    assert " 14 quantized to fp8 (+ as many scales; 4 of them merged with the adapter first)" in (
        done.stdout
    ), done.stdout
    got = tensors_of(out)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    verified = cli("verify", out)
    assert verified.returncode == 0 and "held to PEFT's merge" in verified.stdout


def test_verify_fails_a_merge_quantized_from_the_base(wide_llama: Path, tmp_path: Path) -> None:
    """Codes quantized from the base rather than the merge (the adapter forgotten), or a
    scale off by 1%, fail verify naming the tensor."""
    adapter = make_adapter(wide_llama, tmp_path / "ad", r=8, lora_alpha=16,
                           target_modules=LLAMA_LINEARS)  # fmt: skip
    one, plain = tmp_path / "one", tmp_path / "plain"
    fastcast.convert(wide_llama, output=one, merge_lora=adapter, quantize="fp8", progress=False)
    fastcast.convert(wide_llama, output=plain, quantize="fp8", progress=False)
    st = require("safetensors.torch")
    shard = next(one.glob("*.safetensors"))
    state = st.load_file(str(shard))
    forgotten = "model.layers.0.self_attn.q_proj.weight"
    state[forgotten] = tensors_of(plain)[forgotten]
    off = "model.layers.1.mlp.down_proj.weight_scale_inv"
    state[off] = state[off] * 1.01
    st.save_file(state, str(shard), metadata={"format": "pt"})
    done = cli("verify", one)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for name in (forgotten, off):
        assert f"mismatch: {name} ({shard.name})" in done.stdout, done.stdout


@pytest.mark.parametrize(("name", "scheme"), [("deepseek-fp8", "fp8"),
                                             ("bnb-nf4-dq", "fp8-channel")])  # fmt: skip
def test_a_quantized_base_merged_and_quantized_again_in_one_run(
    tmp_path: Path, name: str, scheme: str
) -> None:
    """What people fine-tuning an fp8 (or QLoRA) base need: ``--dequantize --merge-lora A
    --quantize fp8`` dequantizes each weight exactly in f32, adds the update and quantizes
    the f32 sum, in one pass; bit for bit the values and scales ``--quantize`` writes from
    the output of ``--dequantize --merge-lora A --dtype fp32``; verify holds it to PEFT's
    merge math of the reference dequantization."""
    from quantized import ALL

    model = ALL[name](tmp_path / "src")
    plain = tmp_path / "plain"
    fastcast.convert(model.path, "fp32", output=plain, dequantize=True, progress=False)
    targets = ["kv_b_proj", "o_proj"] if name == "deepseek-fp8" else ["q_proj", "down_proj"]
    adapter = make_adapter(plain, tmp_path / "ad", r=4, lora_alpha=8, target_modules=targets)
    one = tmp_path / "one"
    report = fastcast.convert(model.path, "bf16", output=one, dequantize=True, quantize=scheme,
                              merge_lora=adapter, progress=False)  # fmt: skip
    f32, two = tmp_path / "f32", tmp_path / "two"
    fastcast.convert(model.path, "fp32", output=f32, dequantize=True, merge_lora=adapter,
                     progress=False)  # fmt: skip
    fastcast.convert(f32, "bf16", output=two, quantize=scheme, progress=False)
    got, want = tensors_of(one), tensors_of(two)
    assert sorted(got) == sorted(want)
    quantized = [n for n, t in got.items() if t.dtype == torch.float8_e4m3fn]
    merged = [n for n in quantized if n in merged_names(adapter)]
    assert merged and report.tensors_merged_quantized == len(merged)
    assert report.tensors_dequantized_quantized == len(quantized) == report.tensors_quantized
    for n, t in got.items():
        pinned = "e_score_correction_bias" in n  # kept in fp32 by --dequantize, not cast
        assert pinned or torch.equal(t.view(torch.uint8), want[n].view(torch.uint8)), n
    done = cli("verify", one)
    assert done.returncode == 0 and "held to PEFT's merge" in done.stdout, done.stdout
