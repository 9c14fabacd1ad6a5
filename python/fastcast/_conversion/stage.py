"""stage: the copies, and the shards still to write, handed to an executor: the
core's (``run_executor``), or a batch's shared queue or Ray cluster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from fastcast import _core
from fastcast._conversion.prepare import Prepared
from fastcast._core import (
    ModelFolderError,
)
from fastcast._output.transaction import Run
from fastcast._plan.shards import ConversionPlan
from fastcast._progress import ByteProgress


class Executed(Protocol):
    """What running the shards of one conversion did: the core's ``ExecStats``, or a
    batch executor's sum over the shards it ran one by one (``_execute/queue.py``)."""

    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def shards(self) -> list[_core.ShardRecord]: ...


@dataclass(frozen=True)
class Shards:
    """The shards still to write of one conversion, and how: an executor's one
    argument."""

    plan: ConversionPlan
    run: Run
    todo: list[str]
    """Their names (the plan's others were reused from an interrupted run)."""
    threads: int
    chunk_bytes: int
    fp8_overflow: Literal["saturate", "nan"]
    progress: bool | None
    sizes: dict[Path, int]
    """Each input's size when planned (the core refuses one that changed)."""

    @property
    def input_bytes(self) -> int:
        return sum(s.input_bytes for s in self.plan.shards if s.name in self.todo)


class ShardExecutor(Protocol):
    """Writes the shards still to write into the staging folder, journaling each:
    ``run_executor``, or a batch's shared queue or Ray cluster (``_execute/queue.py``)."""

    def __call__(self, shards: Shards) -> Executed | None: ...


def run_executor(shards: Shards) -> _core.ExecStats | None:
    """Hand the shards still to write to the Rust executor, with a progress bar in
    input bytes."""
    if not shards.todo:
        return None
    run = shards.run
    for name in shards.todo:
        run.staged(name)  # the shard's folder
    try:
        with ByteProgress(shards.input_bytes, "converting", shards.progress) as update:
            return _core.execute_plan(
                shards.plan.to_dict(run.staging, shards.sizes, only=set(shards.todo)),
                progress=update,
                threads=shards.threads,
                fsync=run.fsync,
                chunk_bytes=shards.chunk_bytes,
                fp8_overflow=shards.fp8_overflow,
                journal=run.journal,
            )
    except FileNotFoundError as e:
        raise ModelFolderError(f"{e.filename}: {e.strerror} (removed while converting?)") from None


def stage(prepared: Prepared, executor: ShardExecutor) -> Executed | None:
    """Copy the other files and have ``executor`` write the shards still to write, all
    under the staging folder; nothing when a kill interrupted the commit (finishing
    it is all that is left)."""
    run, options = prepared.run, prepared.options
    if run.manifest.phase != "staging":
        return None
    for rel, path in prepared.copies.items():
        run.copy(rel, path)
    return executor(
        Shards(
            prepared.plan, run, prepared.todo, options.threads, options.chunk_bytes,
            options.fp8_overflow, options.progress, prepared.sizes,
        )
    )  # fmt: skip
