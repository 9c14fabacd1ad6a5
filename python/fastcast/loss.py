"""What a conversion loses, made visible: per-tensor counts from the Rust kernels,
the worst tensors, and the range-unsafe casts named before a run starts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastcast.dtype_table import SHORT_NAMES
from fastcast.units import format_bytes


class FastcastWarning(UserWarning):
    """Base of fastcast's warnings."""


class RangeRiskWarning(FastcastWarning):
    """Before a run: a cast that can overflow by construction (e.g. bf16 to fp16)."""


class OverflowWarning(FastcastWarning):
    """After a run: values did overflow (or saturate); the report has the counts."""


@dataclass(frozen=True)
class TensorLoss:
    """Loss counts of one cast tensor (or totals, with ``name="(total)"``)."""

    name: str
    dtype_from: str
    dtype_to: str
    elements: int
    overflow: int
    underflow: int
    nan_in: int
    inf_in: int
    max_abs: float

    @property
    def lossy(self) -> bool:
        return self.overflow > 0 or self.underflow > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: What overflow means for each target, in words.
OVERFLOW_RESULT = {
    "F16": "±inf (|x| >= 65520)",
    "BF16": "±inf (|x| beyond 3.39e38)",
    "F32": "±inf (|x| beyond 3.40e38)",
    "F8_E5M2": "±inf (|x| >= 61440)",
    "F8_E4M3": "±448 when saturating, NaN otherwise (|x| > 464)",
    "F64": "nothing",
}


def total(losses: Iterable[TensorLoss]) -> TensorLoss:
    items = list(losses)
    return TensorLoss(
        "(total)",
        ",".join(sorted({t.dtype_from for t in items})),
        ",".join(sorted({t.dtype_to for t in items})),
        sum(t.elements for t in items),
        sum(t.overflow for t in items),
        sum(t.underflow for t in items),
        sum(t.nan_in for t in items),
        sum(t.inf_in for t in items),
        max((t.max_abs for t in items), default=0.0),
    )


def worst(losses: Sequence[TensorLoss], n: int = 5) -> list[TensorLoss]:
    """The tensors that lost the most: overflow first, then underflow."""
    lossy = [t for t in losses if t.lossy]
    return sorted(lossy, key=lambda t: (-t.overflow, -t.underflow, t.name))[:n]


def describe(losses: Sequence[TensorLoss]) -> list[str]:
    """Summary lines for people: totals, then the worst tensors."""
    if not losses:
        return ["loss: no tensor was cast"]
    t = total(losses)
    lines = []
    if not t.lossy:
        lines.append("loss: no value overflowed or underflowed (only rounding)")
    else:
        over = sum(1 for x in losses if x.overflow)
        under = sum(1 for x in losses if x.underflow)
        targets = sorted({x.dtype_to for x in losses if x.overflow})
        lines.append(
            f"loss: {t.overflow} value(s) overflowed in {over} tensor(s)"
            + (f" (to {', '.join(OVERFLOW_RESULT.get(d, d) for d in targets)})" if over else "")
            + f"; {t.underflow} non-zero value(s) became 0 in {under} tensor(s)"
        )
        for w in worst(losses):
            lines.append(
                f"  {w.name}: {w.overflow} overflowed, {w.underflow} underflowed "
                f"of {w.elements}; max |x| {w.max_abs:.4g}"
            )
    if t.nan_in or t.inf_in:
        lines.append(f"input: {t.nan_in} NaN and {t.inf_in} inf already present (kept)")
    return lines


def narrowing_risks(casts: Iterable[tuple[str, str, int]]) -> list[str]:
    """Warnings for casts that can overflow by construction, before anything runs.

    ``casts`` holds (source dtype, target dtype, bytes) per tensor.
    """
    risky: dict[tuple[str, str], list[int]] = {}
    for src, dst, nbytes in casts:
        wider_range = src in ("F32", "F64", "BF16") and dst == "F16"
        to_fp8 = dst in ("F8_E4M3", "F8_E5M2") and src != dst
        f64_to_32 = src == "F64" and dst in ("F32", "BF16")
        if wider_range or to_fp8 or f64_to_32:
            entry = risky.setdefault((src, dst), [0, 0])
            entry[0] += 1
            entry[1] += nbytes
    return [
        f"casting {n} {src} tensor(s) ({format_bytes(b)}) to {dst} can overflow: values "
        f"beyond its range become {OVERFLOW_RESULT[dst]}; every such value is counted and "
        f"reported (predict it first with: fastcast inspect MODEL --dtype {SHORT_NAMES[dst]})"
        for (src, dst), (n, b) in sorted(risky.items())
    ]
