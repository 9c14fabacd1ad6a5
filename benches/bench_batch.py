"""Batches: three models as one batch vs three runs one after another, and the Ray
executor on a local 2-worker cluster vs the local executor.

    python3 benches/bench_batch.py [--size 1GB] [--repeats 3] [--no-ray]

Generates three fp32 llama-shaped checkpoints once (benches/make_model.py, cached in
benches/.cache/), converts them to bf16 in 200 MB shards with fsync, warm page cache,
and reports medians of interleaved runs:

- sequential: ``fastcast.convert`` three times, one model after the other;
- batch, N lanes: ``fastcast.convert_batch`` with the local executor writing N shards
  at a time, the threads split between them (``fastcast._batch.run.LOCAL_LANES``, default 2);
- ray: ``convert_batch(executor="ray")`` on ``ray.init(num_cpus=2)`` (cluster start-up
  not timed), one thread per shard task, vs the local executor with 2 threads.

Results go to benches/results/batch.md (and .json) and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fastcast
from fastcast._batch import run as batch_run

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
OUT = CACHE / "batch-out"


def models(size: str) -> list[Path]:
    paths = [CACHE / f"batch-{size}-{i}" for i in range(3)]
    for i, p in enumerate(paths):
        if not (p / "config.json").exists():
            subprocess.run(
                [sys.executable, str(HERE / "make_model.py"), str(p), "--size", size,
                 "--dtype", "fp32", "--shard-size", "500MB", "--seed", str(i)],
                check=True,
            )  # fmt: skip
    return paths


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def timed(run: Callable[[], None]) -> float:
    shutil.rmtree(OUT, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def sequential(paths: list[Path], threads: int) -> Callable[[], None]:
    def run() -> None:
        for p in paths:
            fastcast.convert(
                p, "bf16", output=OUT / f"{p.name}-bf16", shard_size="200MB",
                threads=threads, progress=False,
            )  # fmt: skip

    return run


def batch(paths: list[Path], threads: int, lanes: int, executor: str = "local"):
    def run() -> None:
        batch_run.LOCAL_LANES = lanes
        report = fastcast.convert_batch(
            paths, "bf16", output_dir=OUT, shard_size="200MB", threads=threads,
            executor=executor, progress=False,
        )  # fmt: skip
        assert report.ok, report.summary()

    return run


def measure(contenders: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():  # interleaved: drift hits all alike
            times[name].append(timed(run))
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    return times


def rows(times: dict[str, list[float]], base: str, nbytes: int) -> list[str]:
    ref = statistics.median(times[base])
    out = ["| contender | median s | GB/s (input) | vs " + base + " |", "|---|---|---|---|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        out.append(f"| {name} | {med:.2f} | {nbytes / med / 1e9:.2f} | {med / ref:.2f}x |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB", help="each model's tensor bytes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    paths = models(args.size)
    nbytes = sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))
    warm(paths)
    threads = os.cpu_count() or 1
    print(f"three models, {nbytes / 1e9:.2f} GB in all, {threads} threads")
    seq = measure(
        {
            "sequential": sequential(paths, threads),
            "batch, 1 lane": batch(paths, threads, 1),
            "batch, 2 lanes": batch(paths, threads, 2),
            "batch, 3 lanes": batch(paths, threads, 3),
        },
        args.repeats,
    )
    lines = [
        f"## batch benchmark ({time.strftime('%Y-%m-%d')}, {threads} cores, "
        f"{args.size} x 3 fp32 -> bf16, 200 MB shards, fsync, warm page cache)",
        "",
        "### one batch vs three runs",
        "",
        *rows(seq, "sequential", nbytes),
    ]
    samples = {"batch": seq}
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
                 _node_ip_address="127.0.0.1")  # fmt: skip
        try:
            dist = measure(
                {
                    "local executor, 2 threads": batch(paths, 2, 2),
                    "ray, 2 workers x 1 thread": batch(paths, 1, 2, executor="ray"),
                },
                args.repeats,
            )
        finally:
            ray.shutdown()
        lines += ["", "### Ray on a local 2-CPU cluster vs the local executor", ""]
        lines += rows(dist, "local executor, 2 threads", nbytes)
        samples["ray"] = dist
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch.md").write_text(text)
    (RESULTS / "batch.json").write_text(json.dumps(samples, indent=1))
    shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
