"""Every model (safetensors or torch.save files, ``--keep-quantized``, ``--quantize``,
``--dequantize``, both, ``--merge-lora``) is planned by the core (``_core.plan_plain``),
without a Python object per tensor. The Python planner, tensor by tensor
(``object_set``), must plan it the same way, object for object, whatever the layout,
dtypes, ``keep`` globs, shard size and adapter: it is the oracle."""

from __future__ import annotations

import itertools
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
from plan_oracle import object_set
from safetensors.numpy import save_file

import fastcast
from fastcast import _core
from fastcast._conversion.fingerprint import shard_fingerprint
from fastcast._plan.dequantize import QuantizedWeight, quantized_weights
from fastcast._plan.merge import for_set, plan_merge
from fastcast._plan.quantize import quantize_targets, requantize_targets
from fastcast._plan.shards import SetPlan, plan_set
from fastcast._source.adapter import open_adapter
from fastcast._source.folder import ModelFolder, open_model
from fastcast._source.quantization import detect, roles, without_sidecars
from quantized import ALL as QUANTIZED
from quantized_fp4 import ALL_FP4
from zoo import ZOO

#: (target, keep, shard size): cast with and without globs, a dtype kept, shards cut
#: small enough that tensors go alone into shards of their own.
CASES = [
    ("BF16", [], 10**9),
    ("F16", ["*norm*", "*.bias"], 5000),
    (None, [], 3000),
    ("F32", ["*embed*"], 1),
]


def described(sp: SetPlan) -> list[object]:
    """Everything a set plan says, its tensors as objects."""
    return [(s.name, s.metadata, s.data_bytes, s.input_bytes, s.tensors, len(s)) for s in sp.shards]


def columns(sp: SetPlan, source_ids: dict[Path, int]) -> list[object]:
    """What a conversion reads of a set plan without its objects."""
    return [
        (
            shard_fingerprint(s),
            s.names(),
            s.numel(),
            s.plain_columns(),
            s.special(),
            list(s.plan_rows(source_ids)),
        )
        for s in sp.shards
    ] + [sp.index()]


def check_plans_agree(
    folder: ModelFolder,
    quantized: bool = False,
    scheme: str | None = None,
    cases=CASES,
    dequantize: dict[tuple[str, str], QuantizedWeight] | None = None,
) -> int:
    """Plan every set of ``folder`` both ways in every case (``quantized``: its
    quantization state kept, as ``--keep-quantized`` plans it; ``scheme``: quantized,
    as ``--quantize scheme`` plans it; ``dequantize``: those weights dequantized, as
    ``--dequantize`` plans them); the number planned by the core."""
    planned = 0
    for ws in folder.weight_sets:
        ids = {f.path: i for i, f in enumerate(ws.files)}
        dq = None
        if dequantize is not None:
            dq = {name: w for (key, name), w in dequantize.items() if key == ws.key}
        for target, keep, size in cases:
            q = None
            if scheme is not None and dq is not None:  # --dequantize --quantize
                assert target is not None
                q = requantize_targets(ws.tensors, dq, target, keep, scheme)
            elif scheme is not None:
                q = quantize_targets(ws.tensors, target, keep, scheme)
            core = plan_set(ws, target, size, keep, quantized, dq, q, scheme=scheme)
            python = object_set(ws, target, size, keep, quantized, dq, q)
            assert all(s.plain is not None for s in core.shards), "planned by the core"
            assert all(s.plain is None for s in python.shards), "planned in Python"
            # columns first: read before the core's shards make their objects
            assert columns(core, ids) == columns(python, ids), (ws.key, target, keep, size)
            assert described(core) == described(python), (ws.key, target, keep, size)
            assert all(s.plain is None for s in core.shards), "objects made once asked for"
            planned += 1
    return planned


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_core_plans_each_zoo_layout_as_the_python_planner(tmp_path, name):
    layout = ZOO[name](tmp_path)
    assert check_plans_agree(open_model(layout.model))


@pytest.mark.parametrize("name", sorted({**QUANTIZED, **ALL_FP4}))
def test_the_core_plans_each_quantized_model_kept_as_the_python_planner(tmp_path, name):
    """--keep-quantized: the state (codes, scales, zero points, bitsandbytes' state,
    fp32-pinned tensors) keeps its dtype, every other float is cast; each tensor keeps
    its role (the report names the roles of what was not cast)."""
    model = {**QUANTIZED, **ALL_FP4}[name](tmp_path)
    folder = open_model(model.path)
    assert check_plans_agree(folder, quantized=True) == len(CASES) * len(folder.weight_sets)
    (core,) = [plan_set(ws, "F16", 10**9, (), True) for ws in folder.weight_sets[:1]]
    assert {r for s in core.shards for r in s.plain.roles()} - {"plain"}, "roles told"


#: Fixtures --dequantize refuses (their layout is not confirmed): nothing to plan.
NOT_DEQUANTIZED = {"deepseek-v4"}


@pytest.mark.parametrize("name", sorted(NOT_DEQUANTIZED))
def test_what_dequantize_refuses_is_refused_before_planning(tmp_path, name):
    folder = open_model({**QUANTIZED, **ALL_FP4}[name](tmp_path).path)
    with pytest.raises(_core.QuantizedModelError, match="does not reconstruct"):
        quantized_weights(folder, detect(folder), roles(folder))


@pytest.mark.parametrize("name", sorted({**QUANTIZED, **ALL_FP4}.keys() - NOT_DEQUANTIZED))
def test_the_core_plans_each_quantized_model_dequantized_as_the_python_planner(tmp_path, name):
    """--dequantize: each weight under its own name and shape in the place of the tensor
    holding its values, every other tensor of quantization state left out, the model's
    fp32-pinned tensors kept."""
    model = {**QUANTIZED, **ALL_FP4}[name](tmp_path)
    folder = open_model(model.path)
    quant = detect(folder)
    assert quant is not None
    weights = quantized_weights(folder, quant, roles(folder))
    assert weights, "a weight to dequantize"
    folder = without_sidecars(folder)
    cases = [c for c in CASES if c[0] is not None]  # --dequantize needs a target
    planned = check_plans_agree(folder, dequantize=weights, cases=cases)
    assert planned == len(cases) * len(folder.weight_sets)
    ws = folder.weight_sets[0]
    dq = {n: w for (key, n), w in weights.items() if key == ws.key}
    core = plan_set(ws, "BF16", 10**9, (), True, dq)
    assert any(t.dequant for s in core.shards for _, t in s.special()), "dequantized"
    # --dequantize --quantize: requantized weights' values and scales both made of
    # the dequantized weight
    for scheme in ["fp8", "fp8-channel"]:
        planned = check_plans_agree(folder, dequantize=weights, cases=cases, scheme=scheme)
        assert planned == len(cases) * len(folder.weight_sets)


def test_the_cores_planner_refuses_a_malformed_request(tmp_path):
    """What Python sends is checked: a dequantized weight of a tensor the set does not
    have, a dtype or scheme that is no such thing, a merged set's tensors outside its
    sources or made twice, recipes that do not match the shard's made tensors."""
    model = QUANTIZED["awq"](tmp_path)
    folder = open_model(model.path)
    ws = folder.weight_sets[0]
    tables = [f.entries for f in ws.files]
    count = len(ws.names())
    with pytest.raises(ValueError, match=f"tensor {count} of a set of {count}"):
        _core.plan_plain(tables, "BF16", [], 10**9, dequantize=[(count, "w", [1], "BF16")])
    with pytest.raises(_core.DtypeError):
        _core.plan_plain(tables, "BF16", [], 10**9, dequantize=[(0, "w", [1], "BF17")])
    with pytest.raises(ValueError, match="no --quantize scheme"):
        _core.plan_plain(tables, "BF16", [], 10**9, quantize="fp4")
    # merging: a view's rows within the tables, each tensor made once
    rows = len(tables[0])
    member = (0, 0, 0, rows, None)
    with pytest.raises(ValueError, match=f"row {rows} of source 0 of 1 sources"):
        _core.plan_plain(tables, "BF16", [], 10**9, view=([member], []))
    with pytest.raises(ValueError, match="row 0 of source 1 of 1 sources"):
        _core.plan_plain(tables, "BF16", [], 10**9, view=([], [(1, 0, "head", "BF16")]))
    view = ([(0, 0, 0, 0, None)], [])
    with pytest.raises(ValueError, match="tensor 1 of a set of 1"):
        _core.plan_plain(tables, "BF16", [], 10**9, view=view, merged=[(1, "w", [1])])
    with pytest.raises(ValueError, match="tensor 0 made twice"):
        _core.plan_plain(tables, "BF16", [], 10**9, view=view, merged=[(0, "w", [1])] * 2)
    weights = quantized_weights(folder, detect(folder), roles(folder))
    dq = {n: w for (key, n), w in weights.items() if key == ws.key}
    (shard,) = plan_set(ws, "BF16", 10**9, (), True, dq).shards
    assert shard.plain is not None and shard.plain.made()
    ids = list(range(len(ws.files)))
    with pytest.raises(ValueError, match="recipes for the"):
        shard.plain.plan_rows(ids, [])


DTYPES = [np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.float64]


def random_model(root: Path, rng: random.Random, count: int, make, save) -> Path:
    """A model of 1 to 3 safetensors files and their index, each of 1 to ``count``
    tensors: ``make(f, t, taken)`` gives the ``t``th tensor of file ``f`` as (name,
    array), ``taken`` the names given so far; ``save(state, path)`` writes a file."""
    model = root / "model"
    model.mkdir()
    files = rng.randint(1, 3)
    weight_map: dict[str, str] = {}
    for f in range(files):
        state: dict[str, object] = {}
        for t in range(rng.randint(1, count)):
            name, value = make(f, t, weight_map.keys() | state.keys())
            state[name] = value
        file = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        save(state, str(model / file))
        weight_map.update(dict.fromkeys(state, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize("seed", range(8))
def test_the_core_plans_random_models_as_the_python_planner(tmp_path, seed):
    rng = random.Random(seed)

    def make(f: int, t: int, taken: object) -> tuple[str, np.ndarray]:
        shape = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
        name = rng.choice(["layer", "norm", "embed", "x.bias"]) + f".{f}.{t}"
        return name, np.zeros(shape, rng.choice(DTYPES))

    model = random_model(tmp_path, rng, 40, make, save_file)
    assert check_plans_agree(open_model(model)) == len(CASES)


TORCH_DTYPES = ["float32", "bfloat16", "float16", "int64", "uint8", "bool", "float64"]


@pytest.mark.parametrize("seed", range(4))
def test_the_core_plans_random_torch_models_as_the_python_planner(tmp_path, seed):
    """torch.save shards (``pytorch_model-*.bin`` and their index): tensors in any order
    of storage, tied duplicates, every dtype; planned by the core since its tables hold
    torch.save files too."""
    import torch

    rng = random.Random(seed)
    model = tmp_path / "model"
    model.mkdir()
    files = rng.randint(1, 3)
    weight_map = {}
    for f in range(files):
        state = {}
        for t in range(rng.randint(1, 30)):
            dtype = getattr(torch, rng.choice(TORCH_DTYPES))
            shape = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
            name = rng.choice(["layer", "norm", "embed", "x.bias"]) + f".{f}.{t}"
            state[name] = torch.zeros(shape, dtype=dtype)
        tie = rng.choice(list(state))
        state[f"tied.{f}"] = state[tie]  # written once, under the first name
        state = dict(rng.sample(list(state.items()), len(state)))  # any pickle order
        file = f"pytorch_model-{f + 1:05d}-of-{files:05d}.bin"
        torch.save(state, model / file)
        weight_map.update(dict.fromkeys(state, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    folder = open_model(model)
    assert all(f.torch for ws in folder.weight_sets for f in ws.files)
    assert check_plans_agree(folder) == len(CASES)


def test_a_torch_files_table_keeps_each_tensors_pickle_path(tmp_path):
    """Verify loads a torch.save tensor where its keys lead: the core's table keeps them."""
    import torch

    torch.save({"state_dict": {"a.w": torch.ones(2), "b": torch.zeros(3)}}, tmp_path / "m.pth")
    (f,) = open_model(tmp_path / "m.pth").weight_sets[0].files
    assert isinstance(f.entries, _core.Entries)
    assert {t.name: t.pickle_path for t in f.tensors} == {
        "a.w": ("state_dict", "a.w"),
        "b": ("state_dict", "b"),
    }


def test_a_plain_shards_rows_pickle_as_the_rows_they_stand_for(tmp_path):
    """A batch pickles each shard's plan to its worker: the core's rows go as a list."""
    folder = open_model(ZOO["llama"](tmp_path).model)
    ws = folder.weight_sets[0]
    shard = plan_set(ws, "BF16", 10**9).shards[0]
    table = shard.plain
    assert table is not None
    rows = shard.plan_rows({f.path: i for i, f in enumerate(ws.files)})
    assert isinstance(rows, _core.PlainRows) and len(rows) == len(shard)
    back = pickle.loads(pickle.dumps(rows))
    assert back.__class__ is list and back == rows.rows() == list(rows)
    assert back[0][0] == shard.tensors[0].name
    with pytest.raises(ValueError, match="plan ids"):
        table.plan_rows([])


def test_pack_and_lay_out_are_the_cores():
    assert _core.pack([3, 4, 12, 2, 2, 6, 1], 6) == [[0], [2], [1, 3], [4], [5], [6]]
    assert _core.lay_out([("BF16", 4), ("F32", 8), ("BOOL", 3), ("I64", 16)]) == [
        (3, 0, 16),
        (1, 16, 24),
        (0, 24, 28),
        (2, 28, 31),
    ]


#: --quantize's cases: targets it takes (none: each keeps its dtype), globs that keep
#: a decoder Linear or a norm, shard sizes down to one a weight's bundle overflows.
QUANTIZE_CASES = [
    ("BF16", [], 10**9),
    ("F16", ["*.0.mlp.up_proj*", "*norm*"], 70_000),
    (None, [], 20_000),
    ("F32", ["*k_proj*"], 1),
]


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("model", ["llama", "llama-sharded", "mixtral"])
def test_the_core_plans_quantize_as_the_python_planner(tmp_path, model, scheme):
    """--quantize: each quantized weight's e4m3 values and F32 scales, packed together;
    misfits, kept weights and everything else as the rule says."""
    from models import build_llama, build_mixtral

    if model == "mixtral":
        path = build_mixtral(tmp_path / "m", dtype="bfloat16", hidden_size=128,
                             intermediate_size=256)  # fmt: skip
    else:
        shards = "300KB" if model == "llama-sharded" else None
        path = build_llama(tmp_path / "m", dtype="bfloat16", hidden_size=256,
                           intermediate_size=384, max_shard_size=shards)  # fmt: skip
    folder = open_model(path)
    assert check_plans_agree(folder, scheme=scheme, cases=QUANTIZE_CASES) == len(QUANTIZE_CASES)
    ws = folder.weight_sets[0]
    q = quantize_targets(ws.tensors, "BF16", [], scheme)
    core = plan_set(ws, "BF16", 10**9, (), False, None, q, scheme=scheme)
    assert {k for s in core.shards for _, t in s.special() for k in [t.quantized.kind]} == {
        "fp8_weight",
        "fp8_scale",
    }, "quantized by the core"


LINEAR_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj", "mlp.gate", "mlp.experts.0.w1"]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_the_core_plans_quantize_of_random_models_as_the_python_planner(tmp_path, seed):
    """Decoder Linears of random shapes (fitting 128x128 blocks or not, fused siblings
    that misfit), dtypes (some not quantizable) and files."""
    import torch
    from safetensors.torch import save_file as save_torch

    rng = random.Random(seed)

    def make(f: int, t: int, taken: set[str]) -> tuple[str, torch.Tensor]:
        layer, linear = rng.randint(0, 2), rng.choice(LINEAR_NAMES)
        name = f"model.layers.{layer}.{linear}.weight"
        if name in taken:
            name = rng.choice(["model.norm.weight", "lm_head.weight"]) + f".{f}.{t}"
        shape = [rng.choice([128, 256, 100, 384]) for _ in range(rng.choice([2, 2, 1]))]
        dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32, torch.int8])
        return name, torch.zeros(shape, dtype=dtype)

    model = random_model(tmp_path, rng, 12, make, save_torch)
    folder = open_model(model)
    for scheme in ["fp8", "fp8-channel"]:
        assert check_plans_agree(folder, scheme=scheme, cases=QUANTIZE_CASES) == 4


#: Merged models: (base builder keywords, adapter keywords), LoRA on attention and MLP,
#: each kind of change an adapter makes (a replacement resized, a head added, layers
#: stacked again, rows replaced, DoRA on an embedding, a bias).
MERGES = {
    "lora": ({}, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    "resized": ({}, dict(vocab=136, target_modules=["q_proj", "embed_tokens"],
                         modules_to_save=["lm_head"])),
    "head-added": ({"tie_word_embeddings": True},
                   dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "layer-replication": ({}, dict(target_modules=["q_proj"],
                                   layer_replication=[[0, 2], [1, 3], [0, 1]])),
    "trainable-tokens": ({}, dict(target_modules=["q_proj"],
                                 trainable_token_indices=[1, 5, 9, 127])),
    "dora-embedding": ({}, dict(target_modules=["embed_tokens", "o_proj"], use_dora=True)),
    "bias": ({"attention_bias": True}, dict(target_modules=["q_proj"], lora_bias=True)),
    "replaced-linear": ({}, dict(target_modules=["q_proj"], modules_to_save=["up_proj"])),
}  # fmt: skip


def check_merges_agree(
    folder: ModelFolder,
    adapter_path: Path,
    dequantize: dict[tuple[str, str], QuantizedWeight] | None = None,
) -> tuple[int, int]:
    """Plan every set of ``folder`` merged with the adapter both ways, cast in every
    case and quantized by both schemes (``dequantize``: those weights dequantized
    first); where one refuses, the other must refuse the same; the numbers planned and
    refused."""
    adapter = open_adapter(adapter_path)
    merging = plan_merge(folder, adapter, dequantize)
    planned = refused = 0
    for ws in folder.weight_sets:
        merge = for_set(merging, ws.key)
        ids = {f.path: i for i, f in enumerate([*ws.files, adapter.file])}
        dq = None
        if dequantize is not None:
            dq = {name: w for (key, name), w in dequantize.items() if key == ws.key}
        schemes = [None] + ([] if merging.layers else ["fp8", "fp8-channel"])
        for (target, keep, size), scheme in itertools.product(CASES, schemes):
            if dq is not None and target is None:
                continue  # --dequantize needs a target
            q = None
            if scheme is not None and dq is not None:
                assert target is not None
                q = requantize_targets(ws.tensors, dq, target, keep, scheme)
            elif scheme is not None:
                q = quantize_targets(ws.tensors, target, keep, scheme)
            try:
                python = object_set(ws, target, size, keep, dq is not None, dq, q, merge)
            except _core.QuantizedModelError as refusal:
                with pytest.raises(_core.QuantizedModelError, match=re.escape(str(refusal))):
                    plan_set(ws, target, size, keep, dq is not None, dq, q, merge, scheme=scheme)
                refused += 1
                continue
            core = plan_set(ws, target, size, keep, dq is not None, dq, q, merge, scheme=scheme)
            assert all(s.plain is not None for s in core.shards), "planned by the core"
            case = (ws.key, target, keep, size, scheme)
            assert columns(core, ids) == columns(python, ids), case
            assert described(core) == described(python), case
            planned += 1
    return planned, refused


@pytest.mark.parametrize("name", sorted(MERGES))
def test_the_core_plans_merged_models_as_the_python_planner(tmp_path, name):
    """--merge-lora: merged weights, replaced and added tensors, layers stacked again,
    as they are, cast, in small shards, and quantized (the refusals alike)."""
    from adapters import make_adapter
    from models import build_llama

    base_keywords, adapter_keywords = MERGES[name]
    base = build_llama(tmp_path / "base", **{"tie_word_embeddings": False, **base_keywords},
                       num_hidden_layers=4, dtype="bfloat16", hidden_size=256,
                       intermediate_size=384)  # fmt: skip
    adapter = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, **adapter_keywords)
    planned, refused = check_merges_agree(open_model(base), adapter)
    assert planned >= len(CASES)
    assert refused == (2 * len(CASES) if name == "replaced-linear" else 0)


def test_the_core_plans_merged_conv1d_and_quantized_bases_as_the_python_planner(tmp_path):
    """GPT-2's Conv1D layers; an AWQ base dequantized, merged, and quantized again."""
    from adapters import build_gpt2, make_adapter

    gpt2 = build_gpt2(tmp_path / "gpt2")
    conv = make_adapter(gpt2, tmp_path / "ad-gpt2", r=4, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"])  # fmt: skip
    assert check_merges_agree(open_model(gpt2), conv) == (3 * len(CASES), 0)
    quantized = QUANTIZED["awq"](tmp_path / "awq").path
    plain = tmp_path / "awq-fp32"  # the base as PEFT trains on it
    fastcast.convert(quantized, "fp32", output=plain, dequantize=True, progress=False)
    adapter = make_adapter(plain, tmp_path / "ad-awq", r=4, target_modules=["q_proj", "down_proj"])
    folder = open_model(quantized)
    weights = quantized_weights(folder, detect(folder), roles(folder))
    planned, _ = check_merges_agree(without_sidecars(folder), adapter, weights)
    assert planned == 3 * (len(CASES) - 1)  # --dequantize needs a target
