"""A batch's shards as jobs: one shard of one model each, run from one queue.

The driver (the process that called ``convert_batch``) plans and stages every model as
``convert`` does; each shard still to write becomes a ``ShardJob``: the model's plan
restricted to that shard. ``run_shard`` is the job's body, the same on this machine
and on a Ray worker: it runs the core executor, writing under a name of its own
attempt's (``<shard>.attempt-<id>``, journaled into ``<that>.jsonl``), so that a retried
or duplicated attempt never writes over another. Only the driver then ``land``s it:
renames the attempt's file to the shard's staged name and appends the attempt's journal
line, verbatim, to the model's journal. So the journal, the indexes and the configs are
written by one process, and a model resumes as after any other interrupted run.

Progress is counted per shard attempt, absolute: a shard shows the most any of its
attempts has done, so a retry never counts its bytes twice.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fastcast import _core
from fastcast._conversion.stage import ShardExecutor, Shards
from fastcast._output.transaction import Run

if TYPE_CHECKING:
    from tqdm import tqdm

#: Reports an attempt's progress: (attempt id, input bytes done so far).
AttemptProgress = Callable[[str, int], None]


@dataclass(frozen=True)
class ShardJob:
    """One shard of one model, as a worker runs it (pure data: it travels to Ray)."""

    model: str
    """The model as typed (progress lines, errors)."""
    name: str
    """The shard's output-relative name."""
    plan: _core.Plan
    """The model's plan restricted to this shard, written at its staged path."""
    input_bytes: int
    threads: int
    chunk_bytes: int
    fsync: bool
    fp8_overflow: Literal["saturate", "nan"]

    @property
    def staged(self) -> Path:
        return Path(self.plan["shards"][0]["path"])


@dataclass(frozen=True)
class ShardDone:
    """A finished attempt: its file, its journal line, what it read and wrote."""

    name: str
    written: str
    journal_line: bytes
    bytes_read: int
    bytes_written: int


def run_shard(job: ShardJob, progress: AttemptProgress | None = None) -> ShardDone:
    """Write ``job``'s shard under this attempt's own name; the job's body everywhere."""
    attempt = uuid.uuid4().hex[:12]
    mine = f"{job.staged}.attempt-{attempt}"
    shard: _core.ShardPlan = {**job.plan["shards"][0], "path": mine}
    journal = Path(f"{mine}.jsonl")
    try:
        stats = _core.execute_plan(
            {**job.plan, "shards": [shard]},
            progress=None if progress is None else lambda n: progress(attempt, n),
            threads=job.threads,
            fsync=job.fsync,
            chunk_bytes=job.chunk_bytes,
            fp8_overflow=job.fp8_overflow,
            journal=journal,
        )
        line = journal.read_bytes()
    finally:
        journal.unlink(missing_ok=True)
    return ShardDone(job.name, mine, line, stats.bytes_read, stats.bytes_written)


def land(done: ShardDone, job: ShardJob, run: Run) -> None:
    """The driver's half of a finished attempt: the shard under its staged name, then
    its journal line in the model's journal (so the journal never names a shard that
    is not in place)."""
    os.replace(done.written, job.staged)
    with open(run.journal, "ab") as f:
        f.write(done.journal_line)
        f.flush()
        if job.fsync:
            os.fsync(f.fileno())


@dataclass
class ShardsWritten:
    """A model's shards written by a batch: what ``convert`` reads of ``ExecStats``."""

    bytes_read: int = 0
    bytes_written: int = 0
    shards: list[_core.ShardRecord] = field(default_factory=list)


class ShardPool(Protocol):
    """Where a batch's shard jobs run: threads here (``LocalPool``) or a Ray cluster."""

    def submit(self, job: ShardJob, board: ShardBoard) -> Future[ShardDone]: ...

    def stop(self, future: Future[ShardDone]) -> None:
        """Ask a running job to stop (its model failed); it ends soon, with an error."""

    def cancel(self) -> None:
        """Stop every job (Ctrl-C)."""


class Cancelled(Exception):
    """Raised from a job's progress callback to make the core stop the job."""


class LocalPool:
    """``lanes`` shards at a time, each on ``threads // lanes`` of the core's threads,
    fed from one queue (first in, first out) with every model's shards."""

    def __init__(self, threads: int, lanes: int) -> None:
        self.lanes = max(1, min(lanes, threads))
        self.threads = max(1, threads // self.lanes)
        self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="fastcast-shard")
        self._stops: dict[Future[ShardDone], threading.Event] = {}
        self.cancel_all = threading.Event()

    def submit(self, job: ShardJob, board: ShardBoard) -> Future[ShardDone]:
        stop = threading.Event()
        future: Future[ShardDone] = self._pool.submit(self._run, job, board, stop)
        self._stops[future] = stop
        future.add_done_callback(lambda f: self._stops.pop(f, None))
        return future

    def _run(self, job: ShardJob, board: ShardBoard, stop: threading.Event) -> ShardDone:
        def progress(attempt: str, n: int) -> None:
            if self.cancel_all.is_set() or stop.is_set():
                raise Cancelled(f"{job.name}: stopped")
            board.set(job.model, job.name, attempt, n)

        job = replace(job, threads=self.threads)
        return run_shard(job, progress)

    def stop(self, future: Future[ShardDone]) -> None:
        future.cancel()  # not started: never will
        stop = self._stops.get(future)
        if stop is not None:
            stop.set()  # running: its next progress report stops it

    def cancel(self) -> None:
        self.cancel_all.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ShardBoard:
    """Progress of every shard attempt, shown as one display: the batch's bytes, and a
    line per model being written. A shard counts the most any attempt of it did."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm  # here, not at import: see ByteProgress

        self._lock = threading.Lock()
        self._attempts: dict[tuple[str, str], dict[str, int]] = {}
        self._shown: dict[tuple[str, str], int] = {}
        self._models: dict[str, tqdm[Any]] = {}
        self.enabled = enabled
        self._overall = tqdm(
            total=total, desc="batch", unit="B", unit_scale=True, unit_divisor=1000,
            disable=not enabled, dynamic_ncols=True, leave=False, position=0,
        )  # fmt: skip

    def add_model(self, model: str, total: int) -> None:
        from tqdm import tqdm

        with self._lock:
            self._overall.total = (self._overall.total or 0) + total
            self._overall.refresh()
            self._models[model] = tqdm(
                total=total, desc=Path(model).name or model, unit="B", unit_scale=True,
                unit_divisor=1000, disable=not self.enabled, dynamic_ncols=True, leave=False,
                position=len(self._models) + 1,
            )  # fmt: skip

    def set(self, model: str, shard: str, attempt: str, done: int) -> None:
        """Attempt ``attempt`` of ``shard`` has read ``done`` bytes (absolute)."""
        key = (model, shard)
        with self._lock:
            attempts = self._attempts.setdefault(key, {})
            attempts[attempt] = max(done, attempts.get(attempt, 0))
            best = max(attempts.values())
            delta = best - self._shown.get(key, 0)
            if delta <= 0:
                return
            self._shown[key] = best
            self._overall.update(delta)
            bar = self._models.get(model)
            if bar is not None:
                bar.update(delta)

    def done(self, model: str) -> None:
        with self._lock:
            bar = self._models.pop(model, None)
        if bar is not None:
            bar.close()

    def shown(self) -> int:
        """Bytes shown so far, over every model."""
        with self._lock:
            return sum(self._shown.values())

    def close(self) -> None:
        for model in list(self._models):
            self.done(model)
        self._overall.close()


def shard_executor(pool: ShardPool, board: ShardBoard, model: str) -> ShardExecutor:
    """A conversion's executor for one model of a batch: its shards go to ``pool`` as
    jobs, each landed as it finishes; the first failure stops the model's others."""

    def execute(shards: Shards) -> ShardsWritten | None:
        if not shards.todo:
            return None
        run, plan = shards.run, shards.plan
        jobs = {}
        for shard in plan.shards:
            if shard.name in shards.todo:
                run.staged(shard.name)  # the shard's folder
                jobs[shard.name] = ShardJob(
                    model, shard.name, plan.to_dict(run.staging, shards.sizes, only={shard.name}),
                    shard.input_bytes, shards.threads, shards.chunk_bytes, run.fsync,
                    shards.fp8_overflow,
                )  # fmt: skip
        board.add_model(model, sum(j.input_bytes for j in jobs.values()))
        try:
            return run_model_shards(pool, board, run, jobs)
        finally:
            board.done(model)

    return execute


def run_model_shards(
    pool: ShardPool, board: ShardBoard, run: Run, jobs: dict[str, ShardJob]
) -> ShardsWritten:
    """Submit every job, land each as it finishes; on the first failure stop the rest,
    land what finished anyway (a resume reuses it), and raise it."""
    pending = {pool.submit(job, board): job for job in jobs.values()}
    result = ShardsWritten()
    failure: BaseException | None = None
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            job = pending.pop(future)
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                if failure is None:
                    failure = error
                    for other in pending:
                        pool.stop(other)
                continue
            done = future.result()
            land(done, job, run)
            board.set(job.model, job.name, "landed", job.input_bytes)
            result.bytes_read += done.bytes_read
            result.bytes_written += done.bytes_written
    if failure is not None:
        raise failure
    records = {r.name: r for r in _core.read_journal(run.journal)}
    result.shards = [records[name] for name in jobs]
    return result
