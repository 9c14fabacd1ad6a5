"""What a conversion loses, made visible: per-tensor counts from the Rust kernels,
the worst tensors, and the range-unsafe casts named before a run starts."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastcast import _core
from fastcast._dtypes import max_finite, short_name
from fastcast._units import format_bytes


class FastcastWarning(UserWarning):
    """Base of fastcast's warnings."""


class RangeRiskWarning(FastcastWarning):
    """Before a run: a cast that can overflow by construction (e.g. bf16 to fp16)."""


class OverflowWarning(FastcastWarning):
    """After a run: values did overflow (or saturate); the report has the counts."""


@dataclass(frozen=True, slots=True)
class TensorLoss:
    """Loss counts of one cast tensor (or totals, with ``name="(total)"``). Slotted:
    a model may have 100k cast tensors (48 bytes less each)."""

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


@functools.cache
def cast_rule(src: str, dst: str) -> _core.CastRule:
    """The core's rule for casting ``src`` to ``dst``, asked once per pair (a model may
    have 100k tensors of the same two dtypes). Read-only: callers share the dict."""
    return _core.cast_rule(src, dst)


def overflow_result(src: str, dst: str) -> str:
    """What overflow does casting ``src`` to ``dst``, in words, from the core's rule:
    ``±inf (|x| >= 65520)``, ``±448 when saturating, NaN otherwise (|x| >= 464.00003)``."""
    rule = cast_rule(src, dst)
    start = rule["overflow_from"]
    if start is None:
        return "nothing (no value overflows)"
    where = f"|x| >= {start:.8g}"
    if rule["saturates"]:
        return f"±{max_finite(dst):g} when saturating, NaN otherwise ({where})"
    return f"±inf ({where})"


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
        pairs = sorted({(x.dtype_from, x.dtype_to) for x in losses if x.overflow})
        results = sorted({overflow_result(a, b) for a, b in pairs})
        lines.append(
            f"loss: {t.overflow} value(s) overflowed in {over} tensor(s)"
            + (f" (to {', '.join(results)})" if over else "")
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


def narrowing_risks(casts: Iterable[tuple[str, str, int]], dequantized: bool = False) -> list[str]:
    """Warnings for casts whose target has a narrower range than the source (the
    core's ``narrows_range``: f32 to f16, anything to fp8...), before anything runs.
    Casts that can overflow only by rounding at the very top of the range (f32 to
    bf16) are not warned about; their overflow is still counted and reported.

    ``casts`` holds (source dtype, target dtype, bytes) per tensor; ``dequantized``
    says they are dequantized weights (their fp32 values, rounded to the target).
    """
    risky: dict[tuple[str, str], list[int]] = {}
    for src, dst, nbytes in casts:
        if src != dst and cast_rule(src, dst)["narrows_range"]:
            entry = risky.setdefault((src, dst), [0, 0])
            entry[0] += 1
            entry[1] += nbytes
    warnings = []
    for (src, dst), (n, size) in sorted(risky.items()):
        what = f"casting {n} {src} tensor(s) ({format_bytes(size)})"
        hint = f"predict it first with: fastcast inspect MODEL --dtype {short_name(dst)}"
        if dequantized:
            what = f"dequantizing {n} weight(s) ({format_bytes(size)} as fp32)"
            hint = "--strict refuses to write them"
        warnings.append(
            f"{what} to {dst} can overflow: values beyond its range become "
            f"{overflow_result(src, dst)}; every such value is counted and reported ({hint})"
        )
    return warnings
