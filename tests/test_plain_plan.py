"""A model of plain safetensors files is planned by the core (``_core.plan_plain``),
without a Python object per tensor; quantized and torch.save models by the Python
planner, tensor by tensor. Both must plan a plain model the same way, object for
object, whatever the layout, dtypes, ``keep`` globs and shard size: the Python
planner, handed the same files as lists, is the oracle."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fastcast import _core
from fastcast._conversion.fingerprint import shard_fingerprint
from fastcast._plan.shards import SetPlan, plan_set
from fastcast._source.folder import ModelFolder, WeightSet, open_model
from zoo import ZOO

#: (target, keep, shard size): cast with and without globs, a dtype kept, shards cut
#: small enough that tensors go alone into shards of their own.
CASES = [
    ("BF16", [], 10**9),
    ("F16", ["*norm*", "*.bias"], 5000),
    (None, [], 3000),
    ("F32", ["*embed*"], 1),
]


def as_lists(ws: WeightSet) -> WeightSet:
    """``ws`` with its files' tensors as lists: planned by the Python planner."""
    return dataclasses.replace(
        ws, files=[dataclasses.replace(f, entries=f.tensors) for f in ws.files]
    )


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


def check_plans_agree(folder: ModelFolder) -> int:
    """Plan every safetensors set of ``folder`` both ways in every case; the number
    planned by the core."""
    planned = 0
    for ws in folder.weight_sets:
        if any(f.torch for f in ws.files):
            continue
        ids = {f.path: i for i, f in enumerate(ws.files)}
        for target, keep, size in CASES:
            core = plan_set(ws, target, size, keep)
            python = plan_set(as_lists(ws), target, size, keep)
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
    planned = check_plans_agree(open_model(layout.model))
    assert planned or name in ("llama-bin", "checkpoint-pth")


DTYPES = [np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.float64]


@pytest.mark.parametrize("seed", range(8))
def test_the_core_plans_random_models_as_the_python_planner(tmp_path, seed):
    rng = random.Random(seed)
    model = tmp_path / "model"
    model.mkdir()
    files = rng.randint(1, 3)
    weight_map = {}
    for f in range(files):
        state = {}
        for t in range(rng.randint(1, 40)):
            dtype = rng.choice(DTYPES)
            shape = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
            name = rng.choice(["layer", "norm", "embed", "x.bias"]) + f".{f}.{t}"
            state[name] = np.zeros(shape, dtype)
        file = f"model-{f + 1:05d}-of-{files:05d}.safetensors"
        save_file(state, str(model / file))
        weight_map.update(dict.fromkeys(state, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_plans_agree(open_model(model)) == len(CASES)


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
