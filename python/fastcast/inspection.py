"""``fastcast.inspect``: what a model folder holds, read-only, headers only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastcast import _core
from fastcast.dtype_table import from_torch_name, is_castable, torch_name
from fastcast.loss import TensorLoss, describe
from fastcast.model_dir import ModelFolder, config_dtypes, open_model, read_config
from fastcast.plan import plan_conversion
from fastcast.progress import ByteProgress
from fastcast.units import format_bytes


@dataclass(frozen=True)
class DtypeCount:
    dtype: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class WeightSetInfo:
    prefix: str
    index: str | None
    shards: list[str]


@dataclass(frozen=True)
class ModelInspection:
    """Shards, tensors, stored dtypes and what config.json claims about them."""

    path: Path
    weight_sets: list[WeightSetInfo]
    tensors: int
    bytes: int
    dtypes: list[DtypeCount]
    config_dtypes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: With ``dtype=``: what converting to it would lose, per cast tensor.
    predicted: list[TensorLoss] | None = None
    predicted_dtype: str | None = None

    @property
    def float_dtype(self) -> str | None:
        """The float dtype holding most of the float bytes, if any."""
        floats = [d for d in self.dtypes if is_castable(d.dtype)]
        return max(floats, key=lambda d: d.bytes).dtype if floats else None

    def render(self) -> str:
        lines = [f"{self.path}"]
        for ws in self.weight_sets:
            lines.append(
                f"  {ws.prefix}: {len(ws.shards)} shard{'s' if len(ws.shards) != 1 else ''}"
                + (f" (index {ws.index})" if ws.index else f" ({ws.shards[0]})")
            )
        lines.append(f"  {self.tensors} tensors, {format_bytes(self.bytes)}")
        lines.append(f"  {'dtype':<12}{'tensors':>9}{'bytes':>12}{'share':>8}")
        for d in self.dtypes:
            share = 100 * d.bytes / self.bytes if self.bytes else 0
            lines.append(f"  {d.dtype:<12}{d.tensors:>9}{format_bytes(d.bytes):>12}{share:>7.1f}%")
        if self.config_dtypes:
            claims = ", ".join(f"{k}={v}" for k, v in self.config_dtypes.items())
            lines.append(f"  config.json: {claims}")
        else:
            lines.append("  config.json: no dtype")
        if self.predicted is not None:
            lines.append(f"  converting to {self.predicted_dtype} would give:")
            lines.extend(f"    {line}" for line in describe(self.predicted))
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def inspect(
    model: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    keep: Sequence[str] = (),
    progress: bool | None = None,
) -> ModelInspection:
    """Describe a model folder (or a .safetensors file) from its headers alone.

    Warns when config.json's dtype disagrees with the stored float weights —
    the "config says float32 but the weights are bf16" trap. With ``dtype``,
    also reads every tensor (read-only) and predicts what converting to it
    would lose: overflow, underflow, NaN/inf already there, max |x|.

    >>> print(inspect("model/", dtype="fp16").render())  # doctest: +SKIP
    """
    folder = open_model(model)
    counts: dict[str, list[int]] = {}
    for t in folder.tensors:
        c = counts.setdefault(t.dtype, [0, 0])
        c[0] += 1
        c[1] += t.nbytes
    dtypes = [DtypeCount(d, n, b) for d, (n, b) in sorted(counts.items(), key=lambda i: -i[1][1])]
    claims = config_dtypes(read_config(folder.config)) if folder.config else {}
    target = _core.parse_dtype(dtype) if dtype is not None else None
    predicted = predict_loss(folder, target, keep, progress) if target is not None else None
    info = ModelInspection(
        path=Path(model),
        weight_sets=[
            WeightSetInfo(
                ws.prefix, ws.index.name if ws.index else None, [f.path.name for f in ws.files]
            )
            for ws in folder.weight_sets
        ],
        tensors=len(folder.tensors),
        bytes=sum(t.nbytes for t in folder.tensors),
        dtypes=dtypes,
        config_dtypes=claims,
        warnings=list(folder.warnings),
        predicted=predicted,
        predicted_dtype=target,
    )
    stored = info.float_dtype
    for key, claimed in claims.items():
        name = from_torch_name(claimed)
        if stored is not None and name is not None and name != stored:
            info.warnings.append(
                f"config.json says {key}={claimed} but the float weights are stored as "
                f"{stored} ({torch_name(stored)}); loaders trusting the config will "
                "up- or down-cast them"
            )
    return info


def predict_loss(
    folder: ModelFolder, dtype: str, keep: Sequence[str], progress: bool | None
) -> list[TensorLoss]:
    """Scan the inputs as a conversion to ``dtype`` would, writing nothing."""
    plan = plan_conversion(folder, dtype, 2**62, keep)
    sizes = {p: p.stat().st_size for p in plan.sources}
    by_name = {t.entry.name: t for t in plan.tensors}
    total = sum(t.entry.nbytes for t in plan.tensors if t.is_cast)
    with ByteProgress(total, "scanning", progress) as update:
        found = _core.scan_plan(plan.to_json(folder.root, sizes), progress=update)
    return [
        TensorLoss(name, by_name[name].entry.dtype, by_name[name].dtype, **counts)
        for name, counts in found
    ]
