"""What a resumed run must share with the run it finishes: the same inputs (by
resolved path, size and mtime), the same plan, the same fastcast; its parts are
recorded, so that a refusal can say which differs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastcast import _core
from fastcast._plan.shards import ConversionPlan, PlannedShard, PlannedTensor
from fastcast._source.folder import ModelFolder, TorchOptions


def fingerprint(
    folder: ModelFolder, plan: ConversionPlan, fp8_overflow: str, torch: TorchOptions
) -> tuple[str, dict[str, Any]]:
    """What a resumed run must share with the run it finishes: the same inputs (by
    resolved path, size and mtime), the same plan, the same fastcast. Returns its digest
    and its parts (recorded, so that a refusal can say which part differs)."""
    # resolved: the same model typed another way (../base, a link) is the same run
    inputs = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in plan.sources]
    shards = [shard_fingerprint(s) for s in plan.shards]
    parts: dict[str, Any] = {
        "fastcast": _core.__version__,
        "model": str(folder.root.resolve()),
        "dtype": plan.dtype,
        "shard_size": plan.shard_size,
        "fp8_overflow": fp8_overflow,
        "torch": [torch.state_dict_key, torch.strip_prefix],
        "inputs": inputs,
        "plan": hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def shard_fingerprint(s: PlannedShard) -> list[Any]:
    """A planned shard's part of the fingerprint: its name, a digest of its tensors'
    source names and dtypes (``PlannedShard.digest``), and for each dequantized or
    quantized one what decides its values (``special_fingerprint``), by position."""
    return [s.name, s.digest(), [[i, special_fingerprint(t)] for i, t in s.special()]]


def special_fingerprint(t: PlannedTensor) -> list[Any]:
    """What decides a dequantized or quantized tensor's values: its name, and its
    source's config parameters and operands, or its block."""
    if t.merged is not None:  # merged into a dequantized base, or quantized: all decide it
        base = None if t.dequant is None else t.dequant.weight.describe()
        quantized = None if t.quantized is None else t.quantized.describe()
        return [t.name, t.merged.describe(), base, quantized]
    if t.dequant is not None and t.quantized is not None:  # dequantized, then quantized
        return [t.name, t.dequant.weight.describe(), t.quantized.describe()]
    if t.dequant is not None:
        return [t.name, t.dequant.weight.describe()]
    assert t.quantized is not None
    return [t.name, t.quantized.describe()]
