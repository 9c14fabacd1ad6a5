"""What a conversion loses, made visible: per-tensor counts from the Rust kernels,
the worst tensors, and the range-unsafe casts named before a run starts."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

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


#: A tensor's name to its label in reports, the dtype of its values, the dtype written.
Labels = Callable[[str], tuple[str, str, str]]
#: The integer counts of a ``TensorLoss``, in the order of the core's loss columns.
COUNTS = ("elements", "overflow", "underflow", "nan_in", "inf_in")


class LossTable(Sequence[TensorLoss]):
    """The loss counts of a run's cast tensors, kept as the core's columns: a
    ``TensorLoss`` is made only for a tensor looked at. A model of 100k cast tensors
    spent 0.2 s making them all, for a summary that names five; sums and the tensors
    that overflowed come from the columns (``loss_sum``, ``with_nonzero``).

    Each part is one shard's: its tensors' names, its columns (see
    ``_core.ShardRecord.loss_columns``), and what gives a name's label and dtypes."""

    def __init__(self, parts: Iterable[tuple[list[str], bytes, Labels]]) -> None:
        self._parts: list[tuple[list[str], memoryview[int], memoryview[float], Labels]] = []
        self._starts: list[int] = []
        n = 0
        for names, columns, describe in parts:
            if not names:
                continue
            view = memoryview(columns)
            k = 8 * len(names)
            self._parts.append((names, view[: 5 * k].cast("Q"), view[5 * k :].cast("d"), describe))
            self._starts.append(n)
            n += len(names)
        self._len = n

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> TensorLoss: ...
    @overload
    def __getitem__(self, i: slice) -> list[TensorLoss]: ...
    def __getitem__(self, i: int | slice) -> TensorLoss | list[TensorLoss]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("loss index out of range")
        p = bisect.bisect_right(self._starts, i) - 1
        return self._row(p, i - self._starts[p])

    def __iter__(self) -> Iterator[TensorLoss]:
        for p, (names, _, _, _) in enumerate(self._parts):
            for j in range(len(names)):
                yield self._row(p, j)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __reduce__(self) -> tuple[type[list[TensorLoss]], tuple[list[TensorLoss]]]:
        """Pickled (a report returned from a Ray task, say) as the list it stands for:
        the columns are views, and the labels are looked up in the plan."""
        return list, (list(self),)

    def __repr__(self) -> str:
        return f"LossTable(<{self._len} tensors>)"

    def _row(self, p: int, j: int) -> TensorLoss:
        names, counts, max_abs, describe = self._parts[p]
        n = len(names)
        label, dtype_from, dtype_to = describe(names[j])
        c = counts[j::n]  # this tensor's value in each of the five count columns
        return TensorLoss(label, dtype_from, dtype_to, c[0], c[1], c[2], c[3], c[4], max_abs[j])

    def _column(self, field: str) -> Iterator[tuple[int, memoryview]]:
        k = COUNTS.index(field)
        for p, (names, counts, _, _) in enumerate(self._parts):
            n = len(names)
            yield p, counts[k * n : (k + 1) * n]

    def sum(self, field: str) -> int:
        """The total of one of ``COUNTS``."""
        return sum(sum(column) for _, column in self._column(field))

    def nonzero(self, *fields: str) -> list[TensorLoss]:
        """The tensors with any of ``fields`` non-zero, in order."""
        rows: set[tuple[int, int]] = set()
        for field in fields:
            for p, column in self._column(field):
                rows.update((p, j) for j, v in enumerate(column) if v)
        return [self._row(p, j) for p, j in sorted(rows)]


def loss_sum(losses: Sequence[TensorLoss], field: str) -> int:
    """The total of one of ``COUNTS`` over ``losses``."""
    if isinstance(losses, LossTable):
        return losses.sum(field)
    return sum(getattr(t, field) for t in losses)


def with_nonzero(losses: Sequence[TensorLoss], *fields: str) -> list[TensorLoss]:
    """The tensors of ``losses`` with any of ``fields`` non-zero, in order."""
    if isinstance(losses, LossTable):
        return losses.nonzero(*fields)
    return [t for t in losses if any(getattr(t, f) for f in fields)]


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
    lossy = with_nonzero(losses, "overflow", "underflow")
    return sorted(lossy, key=lambda t: (-t.overflow, -t.underflow, t.name))[:n]


class Losses(list[TensorLoss]):
    """A list of ``TensorLoss`` that prints as its summary (the worst tensors and the
    totals), not as every tensor's record: a model has hundreds of cast tensors."""

    def __repr__(self) -> str:
        lines = describe(self)
        return f"<{len(self)} cast tensor(s): " + "; ".join(ln.strip() for ln in lines) + ">"

    def __str__(self) -> str:
        return "\n".join(describe(self))


def describe(losses: Sequence[TensorLoss]) -> list[str]:
    """Summary lines for people: totals, then the worst tensors."""
    if not losses:
        return ["loss: no tensor was cast"]
    lines = []
    lossy = with_nonzero(losses, "overflow", "underflow")
    if not lossy:
        lines.append("loss: no value overflowed or underflowed (only rounding)")
    else:
        over = [x for x in lossy if x.overflow]
        under = sum(1 for x in lossy if x.underflow)
        pairs = sorted({(x.dtype_from, x.dtype_to) for x in over})
        results = sorted({overflow_result(a, b) for a, b in pairs})
        lines.append(
            f"loss: {sum(x.overflow for x in over)} value(s) overflowed in {len(over)} "
            "tensor(s)"
            + (f" (to {', '.join(results)})" if over else "")
            + f"; {sum(x.underflow for x in lossy)} non-zero value(s) became 0 in {under} "
            "tensor(s)"
        )
        for w in worst(lossy):
            lines.append(
                f"  {w.name}: {w.overflow} overflowed, {w.underflow} underflowed "
                f"of {w.elements}; max |x| {w.max_abs:.4g}"
            )
    nan_in, inf_in = loss_sum(losses, "nan_in"), loss_sum(losses, "inf_in")
    if nan_in or inf_in:
        lines.append(f"input: {nan_in} NaN and {inf_in} inf already present (kept)")
    return lines


def narrowing_risks(
    src: Sequence[str], dst: Sequence[str], nbytes: Iterable[int], dequantized: bool = False
) -> list[str]:
    """Warnings for casts whose target has a narrower range than the source (the
    core's ``narrows_range``: f32 to f16, anything to fp8...), before anything runs.
    Casts that can overflow only by rounding at the very top of the range (f32 to
    bf16) are not warned about; their overflow is still counted and reported.

    Per tensor, as columns: source dtype, target dtype and bytes (``nbytes`` is read
    only when some pair narrows: a model may have 100k tensors, and a handful of
    pairs); ``dequantized`` says they are dequantized weights (their fp32 values,
    rounded to the target).
    """
    narrowing = {
        (s, d)
        for s, d in set(zip(src, dst, strict=True))
        if s != d and cast_rule(s, d)["narrows_range"]
    }
    risky: dict[tuple[str, str], list[int]] = {}
    if narrowing:
        for pair, size in zip(zip(src, dst, strict=True), nbytes, strict=True):
            if pair in narrowing:
                entry = risky.setdefault(pair, [0, 0])
                entry[0] += 1
                entry[1] += size
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
