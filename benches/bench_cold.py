"""Cold-cache benchmark on a checkpoint larger than RAM: the regime of 70B models.

    python3 benches/bench_cold.py [--repeats 3] [--scale 1.5] [--cap 1GiB]

Generates (streamed, cached in benches/.cache/) a Llama-shaped fp32 checkpoint of
``--scale`` times the machine's RAM in 5 GB shards, so no run can keep the input in
the page cache, and converts it to bf16 in 5 GB shards. Before every run the inputs
leave the page cache: ``/proc/sys/vm/drop_caches`` where it is writable (root outside
a container), else ``posix_fadvise(DONTNEED)`` on every input after a ``sync``; the
page-cache residency of the inputs is measured (``mincore``) and printed before each
run, so a cache that could not be emptied shows. Interleaved, per repeat:

  floor             io_floor --fsync: maps every input, reads all of it, writes as
                    many bytes as the output holds, fsync, no cast
  streaming floor   the same with --stream: each input chunk dropped from the page
                    cache once read, outputs written back as they are written (the
                    I/O fastcast does; without it the cache fills with the input and
                    reads wait for reclaim, a floor fastcast beats)
  fastcast          the CLI (fsync on, as always)
  fastcast, capped  the same inside a memory cgroup of ``--cap`` (cgroup v1 or v2,
                    root): the page cache it may fill is capped too
  script            per shard: safetensors load_file -> .to(bf16) -> save_file (no
                    fsync; it takes the whole shard in memory)

then once: a resume. fastcast is SIGKILLed once it has written 90% of the output's
bytes (``wchar``), the cache is emptied, and the resumed run is timed, with the bytes it
read from the disk (ru_inblock); its output must be byte-identical (SHA-256 of every
output file) to the fresh run's. ``--resume-only`` runs one fresh run and this.

Needs free disk for the input (once), one output, and 2 GB to spare; when short it
prints what it needs and exits 0 without running. The table goes to
benches/results/cold.md (and .json) and stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_convert import (
    CACHE,
    HERE,
    RESULTS,
    Model,
    Row,
    contenders,
    inputs,
    make_cgroup,
    measure,
    prepare_contenders,
    remove_cgroup,
)

import fastcast

SHARD = "5GB"
#: Output shards: ten of them, so that a kill at 90% leaves one to do.
OUT_SHARD = "2GB"
SPARE = 2 * 10**9
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]  # fmt: skip
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no MemTotal in /proc/meminfo")


def resident(paths: list[Path]) -> int:
    """Bytes of ``paths`` in the page cache (``mincore`` over a fresh mapping)."""
    page = mmap.PAGESIZE
    total = 0
    for p in paths:
        size = p.stat().st_size
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                vec = ctypes.create_string_buffer((size + page - 1) // page)
                if LIBC.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                total += int((np.frombuffer(vec.raw, np.uint8) & 1).sum()) * page
            finally:
                LIBC.munmap(addr, size)
        finally:
            os.close(fd)
    return total


def empty_cache(paths: list[Path]) -> str:
    """Take ``paths`` out of the page cache; say how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def commands(model: Model, out: Path, out_bytes: int) -> dict[str, list[str]]:
    """What bench_convert runs for ``model`` (the floor, fastcast's CLI, the per-shard
    script), and the floor with ``--stream``."""
    usual = contenders(model, out, out_bytes)
    floor = usual["floor (fsync)"]
    return {
        "floor (fsync)": floor,
        "floor (fsync, streaming)": [floor[0], "--stream", *floor[1:]],
        "fastcast": usual["fastcast (CLI)"],
        "script": usual["script"],
    }


def digests(out: Path) -> dict[str, tuple[int, str]]:
    """Size and SHA-256 of every file under ``out`` (staging excluded), by relative path."""
    found = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and ".fastcast-staging" not in p.parts:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(16 << 20):
                    h.update(block)
            found[str(p.relative_to(out))] = (p.stat().st_size, h.hexdigest())
    return found


def journaled(journal: Path) -> tuple[int, int]:
    """Shards in ``journal`` and their bytes, as a resume reads it (the core's reader:
    a torn last line is not there, nor is a missing journal)."""
    records = fastcast._core.read_journal(journal)
    return len(records), sum(r.size for r in records)


def written(pid: int) -> int:
    """Bytes process ``pid`` has written so far (``wchar`` of /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise SystemExit(f"resume: /proc/{pid}/io has no wchar")


def kill_at_written(cmd: list[str], at_bytes: int, journal: Path) -> tuple[int, int]:
    """Run ``cmd``; SIGKILL it once it has written ``at_bytes``. Returns the shards and
    bytes its journal held at the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        try:
            if written(proc.pid) >= at_bytes:
                proc.send_signal(signal.SIGKILL)
                break
        except FileNotFoundError:  # it just ended
            pass
        time.sleep(0.005)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"resume: the run ended ({proc.returncode}) before it could be killed")
    return journaled(journal)


def run(
    model: Model, repeats: int, cap: int
) -> tuple[list[str], dict[str, list[dict[str, float]]]]:
    out = CACHE / "out-cold"
    total_in = sum(p.stat().st_size for p in inputs(model))
    cmds = commands(model, out, total_in // 2)
    group = make_cgroup(cap)
    rows = {label: Row(label) for label in cmds}
    capped = Row(f"fastcast, {cap >> 20} MiB cgroup")
    order: list[tuple[Row, list[str], Path | None]] = [
        (rows["floor (fsync)"], cmds["floor (fsync)"], None),
        (rows["floor (fsync, streaming)"], cmds["floor (fsync, streaming)"], None),
        (rows["fastcast"], cmds["fastcast"], None),
        *([(capped, cmds["fastcast"], group)] if group else []),
        (rows["script"], cmds["script"], None),
    ]
    left: list[int] = []
    how = ""
    fresh: dict[str, tuple[int, str]] = {}
    try:
        for r in range(repeats):
            for row, cmd, cgroup in order:
                shutil.rmtree(out, ignore_errors=True)
                how = empty_cache(inputs(model))
                left.append(resident(inputs(model)))
                sample = measure(cmd, cgroup=cgroup)
                row.samples.append(sample)
                print(f"  [{r + 1}/{repeats}] {row.label:<24} {sample.wall:7.2f} s "
                      f"(input cached at start: {left[-1] >> 20} MiB)", flush=True)  # fmt: skip
                if row is rows["fastcast"] and not fresh:
                    fresh = digests(out)
    finally:
        if group:
            remove_cgroup(group)
    try:
        resume = run_resume(cmds["fastcast"], model, out, fresh, rows["fastcast"].median("wall"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    table = [
        rows["floor (fsync)"], rows["floor (fsync, streaming)"], rows["fastcast"],
        *([capped] if group else []), rows["script"],
    ]  # fmt: skip
    floor, stream, script = rows["floor (fsync)"], rows["floor (fsync, streaming)"], rows["script"]
    lines = [
        f"### cold page cache: {total_in / 1e9:.1f} GB fp32 "
        f"({total_in / mem_total():.2f}x this machine's RAM) -> bf16, {OUT_SHARD} shards",
        "",
        f"Medians of {repeats} interleaved runs; before each the inputs left the page cache "
        f"({how}; at most {max(left) >> 20} MiB of them still cached at any start). "
        "fsync on for fastcast and the floor; the script does not fsync.",
        "",
        "| run | wall s | each run s | GB/s in | vs floor | vs streaming floor | vs script "
        "| CPU s | read GB | peak RSS MiB | peak anon MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        if not row.ok:
            lines.append(f"| {row.label} | did not finish: exit {[s.code for s in row.samples]} "
                         "| | | | | | | | | |")  # fmt: skip
            continue
        wall = row.median("wall")
        lines.append(
            # Every run, in order: this disk's speed drifts by a third between runs.
            f"| {row.label} | {wall:.2f} | {' / '.join(f'{s.wall:.1f}' for s in row.samples)} "
            f"| {total_in / wall / 1e9:.2f} "
            f"| {wall / floor.median('wall'):.2f}x | {wall / stream.median('wall'):.2f}x "
            f"| {wall / script.median('wall'):.2f}x "
            f"| {row.median('cpu'):.2f} | {row.median('read') / 1e9:.1f} "
            f"| {row.median('peak_rss') / 2**20:.0f} "
            f"| {row.median('peak_anon') / 2**20:.0f} |"
        )
    if not group:
        lines.append("")
        lines.append("(no memory cgroup could be made here: the capped run was skipped)")
    lines += ["", *resume]
    samples = {row.label: [vars(s) for s in row.samples] for row in table}
    return lines, samples


def run_resume(
    cmd: list[str], model: Model, out: Path, fresh: dict[str, tuple[int, str]], fresh_wall: float
) -> list[str]:
    """SIGKILL once 90% of the output is written, empty the cache, time the resumed run."""
    sizes = [size for k, (size, _) in fresh.items() if k.endswith(".safetensors")]
    shards, total_out = len(sizes), sum(sizes)
    shutil.rmtree(out, ignore_errors=True)
    empty_cache(inputs(model))
    journal = out / ".fastcast-staging" / "journal.jsonl"
    held, held_bytes = kill_at_written(cmd, total_out * 9 // 10, journal)
    how = empty_cache(inputs(model))
    sample = measure([*cmd, "--resume"])
    same = digests(out) == fresh
    total_in = sum(p.stat().st_size for p in inputs(model))
    left_in = total_in * (total_out - held_bytes) / total_out  # in proportion to the output

    if not same:
        print("resume: output differs from the fresh run's", file=sys.stderr)
    return [
        f"Resume: SIGKILLed with 90% of the output written, {held} of {shards} output "
        f"shards journaled ({held_bytes / total_out:.0%} of the output's bytes), inputs out "
        f"of the cache ({how}), then resumed: {sample.wall:.2f} s = "
        f"{sample.wall / fresh_wall:.2f}x the fresh run. It read {sample.read / 1e9:.1f} GB "
        f"from the disk (ru_inblock); the inputs of the shards left hold about "
        f"{left_in / 1e9:.1f} GB of the {total_in / 1e9:.1f} GB. Output "
        f"{'byte-identical' if same else 'DIFFERENT'} to the fresh run's (SHA-256 of every "
        "file)."
    ]


def resume_only(model: Model) -> tuple[list[str], dict[str, list[dict[str, float]]]]:
    """A fresh cold run of the CLI, then the resume scenario against it."""
    out = CACHE / "out-cold"
    cmd = commands(model, out, 0)["fastcast"]
    shutil.rmtree(out, ignore_errors=True)
    empty_cache(inputs(model))
    fresh = measure(cmd)
    try:
        resume = run_resume(cmd, model, out, digests(out), fresh.wall)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return resume, {"fastcast": [vars(fresh)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.5, help="input size / RAM")
    parser.add_argument("--cap", default="1GiB", help="memory cap for the capped run")
    parser.add_argument(
        "--resume-only", action="store_true", help="one fresh run, then the resume scenario"
    )
    args = parser.parse_args()
    size = int(args.scale * mem_total() / 1e9 + 0.999)
    model = Model("cold-llama", "llama", f"{size}GB", "fp32", SHARD, "BF16", OUT_SHARD)
    CACHE.mkdir(exist_ok=True)
    have = shutil.disk_usage(CACHE).free
    made = (model.path / "config.json").exists()
    need = (0 if made else size * 10**9) + size * 10**9 // 2 + SPARE
    if have < need:
        print(f"bench_cold: skipped: needs {need / 1e9:.0f} GB free in {CACHE} "
              f"({'' if made else f'{size} GB input, '}{size / 2:.0f} GB output, 2 GB spare), "
              f"has {have / 1e9:.0f} GB")  # fmt: skip
        return
    prepare_contenders()
    if not made:
        subprocess.run(
            [sys.executable, str(HERE / "make_model.py"), str(model.path), "--arch", "llama",
             "--size", f"{size}GB", "--dtype", "fp32", "--shard-size", SHARD],
            check=True,
        )  # fmt: skip
    if args.resume_only:
        lines, samples = resume_only(model)
    else:
        lines, samples = run(model, args.repeats, fastcast.parse_size(args.cap))
    head = [
        f"## fastcast cold-cache benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} "
        f"cores, {mem_total() / 2**30:.1f} GiB RAM)",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    name = "cold-resume" if args.resume_only else "cold"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(samples, indent=1))
    print(f"written to {RESULTS / name}.md")


if __name__ == "__main__":
    main()
