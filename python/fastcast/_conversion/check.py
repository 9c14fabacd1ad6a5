"""check: every shard's loss counts (journaled ones for shards reused from an
interrupted run), and ``--strict``'s refusal when a value overflowed."""

from __future__ import annotations

from collections.abc import Sequence

from fastcast import _core
from fastcast._conversion.prepare import Prepared
from fastcast._conversion.stage import Executed
from fastcast._core import (
    LossError,
)
from fastcast._loss import (
    LossTable,
    TensorLoss,
    with_nonzero,
)
from fastcast._names import listing
from fastcast._plan.shards import ConversionPlan, PlannedShard, PlannedTensor


def shard_losses(plan: ConversionPlan, records: dict[str, _core.ShardRecord]) -> LossTable:
    """Loss counts of every cast tensor, in plan order, matched within each shard (a
    tensor name is unique in a shard, not across a pipeline's components). A
    dequantized tensor's loss is that of rounding its fp32 values."""
    return LossTable(
        (*records[shard.name].loss_columns(), ShardLabels(shard)) for shard in plan.shards
    )


class ShardLabels:
    """A shard's tensor names to (label, dtype of the values, dtype written), for the
    loss records of the few tensors a report names; the table is built on first use."""

    def __init__(self, shard: PlannedShard) -> None:
        self.shard = shard
        self.by_name: dict[str, PlannedTensor] | None = None

    def __call__(self, name: str) -> tuple[str, str, str]:
        if self.by_name is None:
            self.by_name = {t.name: t for t in self.shard.tensors}
        t = self.by_name[name]
        return t.label, t.values_dtype, t.dtype


def overflowed(losses: Sequence[TensorLoss]) -> list[tuple[str, int]]:
    """(tensor, values overflowed) for every tensor that overflowed, worst first."""
    over = with_nonzero(losses, "overflow")
    return sorted(((t.name, t.overflow) for t in over), key=lambda x: (-x[1], x[0]))


def refuse_overflow(bad: list[tuple[str, int]], why: str = "") -> None:
    """``strict``: a LossError naming every tensor that overflowed, worst first."""
    if not bad:
        return
    shown = listing([f"{name} ({n})" for name, n in bad], 5, more=", and")
    raise LossError(
        f"refusing to write (strict){why}: {sum(n for _, n in bad)} value(s) overflowed "
        f"in {len(bad)} tensor(s): {shown}",
        bad,
    )


def check(prepared: Prepared, stats: Executed | None) -> LossTable:
    """Every shard's loss counts (the journal's for reused shards); with ``--strict``
    a LossError if any value overflowed, reused shards included."""
    written = {r.name: r for r in stats.shards} if stats else {}
    losses = shard_losses(prepared.plan, {**prepared.reused, **written})
    if prepared.options.strict:
        refuse_overflow(
            overflowed(losses),
            " (including shards reused from the interrupted run)" if prepared.reused else "",
        )
    return losses
