"""Pieces of the plan's wire format that more than one recipe writes (the core's
``plan/wire.rs`` and ``values/`` read them; ``_core.pyi`` types them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from fastcast import _core
from fastcast._source.entries import TensorEntry

if TYPE_CHECKING:
    #: How the executor reconstructs a dequantized tensor (``kind`` says which).
    DequantPlan: TypeAlias = _core._DequantPlan  # one union, beside the TypedDicts


def operand_plan(e: TensorEntry, source_ids: dict[Path, int]) -> _core.OperandPlan:
    """Another tensor a value kind reads (a scale, a LoRA factor), where it lies."""
    return {
        "name": e.name,
        "source": source_ids[e.file],
        "dtype": e.dtype,
        "shape": list(e.shape),
        "offsets": e.offsets,
    }
