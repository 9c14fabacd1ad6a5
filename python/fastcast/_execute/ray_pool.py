"""``executor="ray"``: a batch's shard jobs as Ray tasks, on the nodes of a cluster.

The driver (this process) plans, stages and commits every model, as with the local
executor; each shard job (``_execute/queue.py``) is a Ray task running ``run_shard``, the core
executor on the model's plan restricted to that shard, writing under its own attempt's
name. Ray reruns a task whose worker died (up to ``MAX_RETRIES`` times); a rerun is a
new attempt with a new name, so a half-written attempt never meets a finished one, and
only the driver renames a finished attempt into place and journals it.

Tensor bytes never pass through Ray: every node reads the inputs and writes the outputs
at the same paths (a shared filesystem), which ``check_shared_paths`` proves up front
by having a task on each node read probe files. Tasks ask for ``num_cpus`` = threads and
``memory`` = ``max_memory``, and are spread over the nodes (``SPREAD``). Progress goes to
an actor per attempt, absolute; the driver polls it, and ``ShardBoard`` shows each
shard's best attempt.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastcast._core import ModelFolderError
from fastcast._execute.queue import ShardBoard, ShardDone, ShardJob, run_shard
from fastcast._units import format_bytes, parse_size

#: Reruns of a shard whose worker died (Ray's default).
MAX_RETRIES = 3
#: How often the driver reads the attempts' progress.
POLL_SECONDS = 0.5
INSTALL_HINT = "the ray executor needs Ray: pip install 'fastcast[ray]'"


class AttemptLog:
    """The Ray actor holding each shard attempt's latest byte count."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}

    def set(self, model: str, shard: str, attempt: str, done: int) -> None:
        self.counts[(model, shard, attempt)] = done

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        return dict(self.counts)


def shard_task(job: ShardJob, log: Any) -> ShardDone:
    """The Ray task: one shard attempt, reporting to the ``AttemptLog`` actor."""
    return run_shard(job, lambda attempt, n: log.set.remote(job.model, job.name, attempt, n))


def probe_task(expected: list[tuple[str, int, bytes]]) -> list[str]:
    """On one node: each (path, size, first bytes) as the driver saw it, or what differs."""
    import socket

    problems = []
    for path, size, head in expected:
        try:
            with open(path, "rb") as f:
                same = f.read(len(head)) == head and os.fstat(f.fileno()).st_size == size
        except OSError as e:
            problems.append(f"{socket.gethostname()} cannot read {path}: {e.strerror}")
            continue
        if not same:
            problems.append(f"{socket.gethostname()} sees another {path} than the driver")
    return problems


class RayPool:
    """Shard jobs as Ray tasks (see the module docstring); a ``ShardPool``."""

    def __init__(self, ray: Any, threads: int, memory: int | None) -> None:
        self.ray = ray
        self.threads = threads
        options: dict[str, Any] = {
            "num_cpus": threads,
            "max_retries": MAX_RETRIES,
            "scheduling_strategy": "SPREAD",
        }
        if memory is not None:
            options["memory"] = memory
        self._task = ray.remote(shard_task).options(**options)
        self._log = ray.remote(num_cpus=0)(AttemptLog).remote()
        self._refs: dict[Future[ShardDone], Any] = {}
        self._boards: set[ShardBoard] = set()
        self._polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="fastcast-ray-progress")

    @classmethod
    @contextmanager
    def start(
        cls,
        address: str | None,
        paths: tuple[list[Path], list[Path]],
        threads: int | None,
        max_memory: int | str | None,
    ) -> Iterator[RayPool]:
        """Join the cluster at ``address`` (else ``RAY_ADDRESS``, else start a local one;
        one already joined is used as it is), check that every node sees the batch's
        ``paths`` (a weight file of each model, the folders it writes in), and leave it
        afterwards if this call joined it."""
        try:
            import ray
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        joined = False
        if not ray.is_initialized():
            join(ray, address)
            joined = True
        try:
            memory = None if max_memory is None else parse_size(max_memory, "max memory")
            check_resources(ray, threads or 1, memory)
            check_shared_paths(ray, *paths)
            pool = cls(ray, threads or 1, memory)
            pool._poller.start()
            try:
                yield pool
            finally:
                pool._polling.set()
                pool._poller.join()
        finally:
            if joined:
                ray.shutdown()

    def submit(self, job: ShardJob, board: ShardBoard) -> Future[ShardDone]:
        self._boards.add(board)
        ref = self._task.remote(job, self._log)
        future: Future[ShardDone] = Future()
        self._refs[future] = ref
        ref.future().add_done_callback(lambda f: self._settle(future, f, job))
        return future

    def _settle(self, future: Future[ShardDone], done: Future[ShardDone], job: ShardJob) -> None:
        """The task's outcome as the shard's: its own error (one line), not Ray's."""
        self._refs.pop(future, None)
        error = done.exception()
        if error is None:
            future.set_result(done.result())
            return
        exceptions = self.ray.exceptions
        if isinstance(error, exceptions.RayTaskError):
            error = error.cause if isinstance(error.cause, BaseException) else error
        elif isinstance(error, exceptions.WorkerCrashedError | exceptions.NodeDiedError):
            error = OSError(
                f"{job.staged}: the Ray worker writing it died, {MAX_RETRIES + 1} times"
            )
        elif isinstance(error, exceptions.TaskCancelledError):
            error = InterruptedError(f"{job.staged}: cancelled")
        future.set_exception(error)

    def stop(self, future: Future[ShardDone]) -> None:
        ref = self._refs.get(future)
        if ref is not None:
            self.ray.cancel(ref)

    def cancel(self) -> None:
        for ref in list(self._refs.values()):
            self.ray.cancel(ref)

    def _poll(self) -> None:
        while not self._polling.wait(POLL_SECONDS):
            try:
                counts = self.ray.get(self._log.snapshot.remote())
            except Exception:  # progress is best effort; the tasks' results are not
                continue
            for (model, shard, attempt), n in counts.items():
                for board in self._boards:
                    board.set(model, shard, attempt, n)


def join(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local instance
    of our own (``address="local"``: never a cluster some other command left running,
    which would refuse the local settings). A failure to join is one line saying where
    and, for a cluster with token authentication, what this side needs."""
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR,
                 object_store_memory=100 << 20, _node_ip_address="127.0.0.1")  # fmt: skip
        return
    try:
        with stderr_muted():  # Ray's C++ client logs each failed attempt to fd 2
            ray.init(address=target, logging_level=logging.ERROR)
    except Exception as e:  # Ray raises several kinds; the message is what matters
        said = " ".join(str(e).split())[:300]
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (
                "; if the cluster was started with RAY_AUTH_MODE=token, set it here too, "
                "with its token (RAY_AUTH_TOKEN, or the token file `ray get-auth-token` "
                "reads)"
            )
        elif "auth" in said.lower() or "token" in said.lower():
            hint = "; check that RAY_AUTH_TOKEN here is the cluster's token"
        raise ValueError(f"cannot join the Ray cluster at {target}: {said}{hint}") from None


@contextmanager
def stderr_muted() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null meanwhile: what native code writes there
    (Ray's connection retries, a line a second) would bury the one-line error."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_resources(ray: Any, threads: int, memory: int | None) -> None:
    """Refuse, in one line, shard tasks no node of the cluster can run: Ray would
    queue them forever (each asks for ``threads`` CPUs and ``memory`` bytes)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((float(r.get("CPU", 0)) for r in nodes), default=0.0)
    if threads > cpus:
        raise ValueError(
            f"--threads {threads}: each Ray task asks for {threads} CPU(s), and the largest "
            f"node of the cluster has {cpus:g}; pass --threads {max(1, int(cpus))} or less"
        )
    room = max((float(r.get("memory", 0)) for r in nodes), default=0.0)
    if memory is not None and memory > room:
        raise ValueError(
            f"--max-memory {format_bytes(memory)}: each Ray task asks for that much, and the "
            f"largest node of the cluster offers {format_bytes(room)}; pass less"
        )


def check_shared_paths(ray: Any, inputs: list[Path], outputs: list[Path]) -> None:
    """Every alive node reads each probe (an input, and a file the driver writes where
    each output will be) as the driver does; else one line naming node and path."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    written = []
    for folder in outputs:
        probe_file = folder / f".fastcast-probe-{uuid.uuid4().hex[:8]}"
        probe_file.write_bytes(uuid.uuid4().bytes)
        written.append(probe_file)
    expected = []
    for p in [*inputs, *written]:
        with open(p, "rb") as f:
            expected.append((str(p.resolve()), p.stat().st_size, f.read(64)))
    try:
        probe = ray.remote(num_cpus=0)(probe_task)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        checks = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(expected)
            for node in nodes
        ]
        problems = [p for found in ray.get(checks) for p in found]
    finally:
        for w in written:
            w.unlink(missing_ok=True)
    if problems:
        raise ModelFolderError(
            f"{problems[0]}: with --executor ray every node must see the inputs and outputs "
            "at the same paths (a shared filesystem)"
            + (f" ({len(problems) - 1} more such problems)" if len(problems) > 1 else "")
        )
