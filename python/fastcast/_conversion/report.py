"""The report of a conversion: ``ConversionReport``, made from what the run did
(or, for a finished output, from its record)."""

from __future__ import annotations

import operator
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcast._conversion.check import refuse_overflow
from fastcast._conversion.prepare import Prepared
from fastcast._conversion.stage import Executed
from fastcast._loss import (
    OverflowWarning,
    TensorLoss,
    describe,
    loss_sum,
)
from fastcast._output.record import RECORD_NAME
from fastcast._output.report_file import write_report
from fastcast._plan.shards import ConversionPlan, PlannedTensor
from fastcast._source.folder import describe_skipped
from fastcast._units import format_bytes


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did; ``summary()`` renders it for people, ``to_dict()``
    for machines (``--report``)."""

    source: Path
    output: Path
    dtype: str | None
    """The target; None: every tensor kept its dtype."""
    shards: list[str]
    indexes: list[str]
    tensors_cast: int
    tensors_copied: int
    tensors_dequantized: int
    bytes_read: int
    bytes_written: int
    seconds: float
    config: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    """Per config file (relative), each dtype key changed: (before, after)."""
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    loss: Sequence[TensorLoss] = field(default_factory=list)
    """Per cast tensor (after a run, a ``LossTable``: made as they are looked at)."""
    warnings: list[str] = field(default_factory=list)
    already_done: bool = False
    """True when the output already held this conversion (``resume=True``)."""
    skipped_why: list[str] = field(default_factory=list)
    tensors_quantized: int = 0
    """Weights ``--quantize`` wrote in fp8 (each with a scale tensor beside it)."""
    tensors_merged: int = 0
    """Weights ``--merge-lora`` added an adapter's update to (written merged; those
    ``--quantize`` then quantized are ``tensors_merged_quantized``)."""
    tensors_merged_quantized: int = 0
    """Of ``tensors_quantized``, the weights merged with the adapter first."""
    tensors_dequantized_quantized: int = 0
    """Of ``tensors_quantized``, the weights dequantized first (``--dequantize
    --quantize``)."""
    range_risks: list[str] = field(default_factory=list)
    """The casts that can overflow, announced before the run (``RangeRiskWarning``;
    the summary does not repeat them)."""

    @property
    def throughput(self) -> float:
        """Input bytes per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def overflowed(self) -> int:
        return loss_sum(self.loss, "overflow")

    def summary(self) -> str:
        if self.already_done:
            return "\n".join(
                [
                    f"already converted: {self.output} holds {self.source} in "
                    f"{self.dtype or 'its own dtypes'} "
                    "with these settings; nothing to do",
                    *(f"  warning: {w}" for w in self.warnings),
                ]
            )
        lines = [
            f"converted {self.source} -> {self.output} "
            f"({self.dtype or 'every tensor in its own dtype'})",
            f"  tensors: {self.tensors_cast} cast, "
            + (f"{self.tensors_dequantized} dequantized, " if self.tensors_dequantized else "")
            + (f"{self.tensors_merged} merged with the adapter, " if self.tensors_merged else "")
            + (
                f"{self.tensors_quantized} quantized to fp8 (+ as many scales"
                + (
                    f"; {self.tensors_dequantized_quantized} of them dequantized first"
                    if self.tensors_dequantized_quantized
                    else ""
                )
                + (
                    f"; {self.tensors_merged_quantized} of them merged with the adapter first"
                    if self.tensors_merged_quantized
                    else ""
                )
                + "), "
                if self.tensors_quantized
                else ""
            )
            + f"{self.tensors_copied} copied as they were"
            + (f" ({len(self.kept)} kept by --keep)" if self.kept else ""),
            f"  bytes: {format_bytes(self.bytes_read)} read, "
            f"{format_bytes(self.bytes_written)} written in {len(self.shards)} "
            f"shard{'s' if len(self.shards) != 1 else ''}"
            + (f" + {', '.join(self.indexes)}" if self.indexes else ""),
            f"  time: {self.seconds:.1f} s ({format_bytes(self.throughput)}/s)",
        ]
        if self.reused:
            lines.append(f"  resumed: {len(self.reused)} shard(s) reused after checking")
        lines.extend(f"  {line}" for line in describe(self.loss))
        for name, changes in self.config.items():
            told = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
            lines.append(f"  {name}: {told}")
        if self.copied:
            lines.append(f"  copied: {', '.join(self.copied)}")
        lines.extend(f"  skipped: {line}" for line in self.skipped_why)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report, JSON-ready."""
        return {
            "source": str(self.source),
            "output": str(self.output),
            "dtype": self.dtype,
            "shards": self.shards,
            "indexes": self.indexes,
            "tensors_cast": self.tensors_cast,
            "tensors_copied": self.tensors_copied,
            "tensors_dequantized": self.tensors_dequantized,
            "tensors_quantized": self.tensors_quantized,
            "tensors_merged": self.tensors_merged,
            "tensors_merged_quantized": self.tensors_merged_quantized,
            "tensors_dequantized_quantized": self.tensors_dequantized_quantized,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "config": {f: {k: list(v) for k, v in c.items()} for f, c in self.config.items()},
            "copied": self.copied,
            "skipped": self.skipped,
            "kept": self.kept,
            "reused": self.reused,
            "already_done": self.already_done,
            "loss_total": {
                "overflow": self.overflowed,
                "underflow": loss_sum(self.loss, "underflow"),
                "nan_in": loss_sum(self.loss, "nan_in"),
                "inf_in": loss_sum(self.loss, "inf_in"),
            },
            "loss": [t.to_dict() for t in self.loss],
            "warnings": self.warnings,
            "range_risks": self.range_risks,
        }


def tensor_kind(t: PlannedTensor) -> str | None:
    """How the report counts a dequantized or quantized tensor (a plain one is cast or
    copied: ``finish_report`` counts those as columns): dequantized, quantized (the e4m3
    values), else None: a quantized weight's scales are counted with it ("+ as many
    scales"), whatever the dtype of the weight they were computed from."""
    if t.quantized is not None:  # merged first, too: counted as quantized
        return "quantized" if t.quantized.kind == "fp8_weight" else None
    if t.merged is not None:  # into a dequantized base too
        return "merged"
    assert t.dequant is not None
    return "dequantized"


def already_done(prepared: Prepared) -> ConversionReport:
    """``resume`` on a finished output with the same inputs and settings: nothing to do
    (``strict`` still refuses one whose values overflowed)."""
    run, notes = prepared.run, prepared.notes
    record = run.record
    assert record is not None
    if prepared.options.strict:
        refuse_overflow(record.overflowed, f" (the finished output in {run.out} holds them)")
    if record.overflowed:
        total = sum(c for _, c in record.overflowed)
        notes.append(
            f"it holds {total} overflowed value(s) in {len(record.overflowed)} tensor(s) "
            f"(see {run.out / RECORD_NAME})"
        )
    shards = [f for f in record.files if f.endswith(".safetensors")]
    return ConversionReport(
        source=prepared.source,
        output=run.out,
        dtype=prepared.options.dtype,
        shards=shards,
        indexes=[f for f in record.files if f.endswith(".index.json")],
        tensors_cast=0,
        tensors_copied=0,
        tensors_dequantized=0,
        bytes_read=0,
        bytes_written=0,
        seconds=0.0,
        reused=shards,
        warnings=notes,
        already_done=True,
        skipped=[s.path for s in prepared.folder.skipped],
    )


def finish_report(
    prepared: Prepared, stats: Executed | None, losses: Sequence[TensorLoss], stacklevel: int
) -> ConversionReport:
    """The report of a committed conversion; warns if values overflowed (at
    ``stacklevel``, the caller's line); writes ``--report``."""
    plan, folder, notes = prepared.plan, prepared.folder, prepared.notes
    target = plan.dtype
    kinds, kept, pinned = counted(plan)
    if kept:
        notes.append(
            f"{len(kept)} tensor(s) kept in their source dtype by --keep; config.json says "
            f"{target}, and transformers casts them to that on load unless the model class "
            "keeps them (e.g. _keep_in_fp32_modules)"
        )
    if pinned:
        notes.append(
            f"{len(pinned)} tensor(s) left in fp32, as the model class pins them "
            f"({', '.join(pinned[:3])}{' ...' if len(pinned) > 3 else ''})"
        )
    result = ConversionReport(
        source=prepared.source,
        output=prepared.out,
        dtype=target,
        shards=[s.name for s in plan.shards],
        indexes=[sp.index_name for sp in plan.sets if sp.index_name],
        tensors_cast=kinds["cast"],
        tensors_copied=kinds["copied"],
        tensors_dequantized=kinds["dequantized"],
        tensors_quantized=kinds["quantized"],
        tensors_merged=kinds["merged"],
        tensors_merged_quantized=kinds["merged quantized"],
        tensors_dequantized_quantized=kinds["dequantized quantized"],
        bytes_read=stats.bytes_read if stats else 0,
        bytes_written=stats.bytes_written if stats else 0,
        seconds=time.perf_counter() - prepared.started,
        config={c.rel: c.changes for c in prepared.configs if c.changes},
        copied=list(prepared.copies),
        skipped=[s.path for s in folder.skipped],
        skipped_why=describe_skipped(folder.skipped),
        kept=kept,
        reused=sorted(prepared.reused),
        loss=losses,
        warnings=notes,
        range_risks=prepared.risks,
    )
    if result.overflowed:
        warnings.warn(
            f"{result.overflowed} value(s) overflowed converting to {target}; see the loss "
            "report (--strict refuses instead)",
            OverflowWarning,
            stacklevel=stacklevel + 1,
        )
    if prepared.report is not None:
        write_report(prepared.report, result.to_dict(), prepared.options.fsync)
    return result


def counted(plan: ConversionPlan) -> tuple[Counter[str | None], list[str], list[str]]:
    """Tensors by what was done to them (``cast``, ``copied``, ``dequantized``,
    ``quantized``), those ``--keep`` kept and those pinned to fp32 (by label)."""
    target = plan.dtype
    kinds: Counter[str | None] = Counter()
    kept: list[str] = []
    pinned: list[str] = []
    for shard in plan.shards:  # as columns: a model may have 100k tensors
        c = shard.plain_columns()
        kinds["cast"] += (cast := sum(map(operator.ne, c.src_dtypes, c.dtypes)))
        kinds["copied"] += len(c.dtypes) - cast
        kinds.update(tensor_kind(t) for _, t in shard.special())
        for _, t in shard.special():
            if tensor_kind(t) == "quantized":
                kinds["merged quantized"] += t.merged is not None
                kinds["dequantized quantized"] += t.dequant is not None
        uncast = shard.uncast(target) if target is not None else []
        kept += [name for name, _, role in uncast if role == "plain"]
        pinned += [label for _, label, role in uncast if role == "pinned fp32"]
    return kinds, kept, pinned
