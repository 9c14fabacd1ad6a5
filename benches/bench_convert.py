"""End-to-end conversion benchmark: fastcast against the I/O floor and the usual scripts.

    python3 benches/bench_convert.py [--quick] [--repeats 3] [--models llama,mixtral]
    python3 benches/bench_convert.py --models deepseek-fp8    # --dequantize
    python3 benches/bench_convert.py --models gpt-oss-mxfp4,nvfp4,w4a16  # --dequantize 4-bit
    python3 benches/bench_convert.py --models llama-quantize  # --quantize fp8
    python3 benches/bench_convert.py --models llama-copy      # no dtype change: a copy
    python3 benches/bench_convert.py --models w4a16-requantize  # --dequantize --quantize fp8
    python3 benches/bench_convert.py --models llama-bin       # torch.save .bin shards
    python3 benches/bench_convert.py --models tensors-100k,tensors-100  # many tiny tensors
    python3 benches/bench_convert.py --models llama --threads 1,4,16   # thread scaling

Generates synthetic checkpoints once (streamed, cached in benches/.cache/):
a Llama-shaped fp32 model of about 5 GB in 2 GB shards and a Mixtral-shaped bf16
model with many expert tensors. Then, on the same input, runs interleaved
(A B C ... A B C ...) and reports medians and ratios:

  floor        maps every input shard, reads all of it, writes as many bytes as the
               output holds, no cast (rust/fastcast-core/examples/io_floor.rs),
               with and without fsync; and with fsync and writeback overlapping
               the reading, as fastcast's does ('floor (fsync, writeback)'; the
               plain one writes everything, then waits for the disk, and is the
               one the ratios are against)
  script       per shard: safetensors.torch.load_file -> .to(dtype) -> save_file
               (for block fp8: compressed-tensors' own CPU converter,
               convert_checkpoint with FP8BlockDequantizer; for gpt-oss MXFP4:
               transformers' from_pretrained with Mxfp4Config(dequantize=True), then
               save_pretrained; for NVFP4 and W4A16: compressed-tensors' decompressor
               per shard; for --quantize fp8: the
               same per-shard script quantizing each decoder Linear in torch, the
               reference formula vectorised, as one writes it by hand; for .bin
               inputs: torch.load(weights_only=True) -> .to(dtype) -> save_file per
               shard, as safetensors' convert.py does, and the same with mmap=True;
               for --dequantize --quantize: fastcast's two runs, --dequantize --dtype
               fp32 to a temporary folder, then --quantize from it)
  transformers from_pretrained(dtype=...) -> save_pretrained(max_shard_size=...)
               (not for block fp8: transformers 5.23 mis-reads partial blocks)
  fastcast     the CLI, and fastcast.convert() from Python; with --threads, the CLI
               again at each of those thread counts (the scaling table is paired
               repeat by repeat against the first count)

For each: wall time, CPU seconds (user+sys), peak RSS and peak anonymous memory
(mapped file pages count in RSS, so RssAnon is the honest number). Then the
memory cap: fastcast inside a 1 GiB memory cgroup on the Llama checkpoint (several
times the cap), and the usual script under the same cap to show that it bites.
Plus the cast kernels' single-thread GB/s. The page cache is warm (inputs are read
once before timing) and the same for every contender. The table goes to
benches/results/ and stdout.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fastcast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


@dataclass
class Model:
    name: str
    arch: str
    size: str
    dtype: str
    shard_size: str
    target: str
    out_shard_size: str
    #: A quantized checkpoint converted with --dequantize.
    dequantize: bool = False
    #: A plain checkpoint converted with --quantize (the scheme).
    quantize: str | None = None
    #: Written as torch.save shards (pytorch_model-*.bin + index) instead of safetensors.
    torch_bin: bool = False
    #: The model whose cached input it converts (another conversion of the same input).
    input: str | None = None
    #: A flat checkpoint of this many equal f32 tensors (``size`` in all, 4 shards), for
    #: the cost per tensor: DeepSeek-V3 has ~91k tensors.
    tensors: int | None = None

    @property
    def path(self) -> Path:
        return CACHE / f"{self.input or self.name}-{self.size}"


@dataclass
class Sample:
    wall: float
    cpu: float
    peak_rss: int
    peak_anon: int
    code: int
    #: Bytes the command read from storage (page-cache misses), from ru_inblock.
    read: int = 0


@dataclass
class Row:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    @property
    def ok(self) -> bool:
        return all(s.code == 0 for s in self.samples)


# --- running and measuring ------------------------------------------------------------


def measure(cmd: list[str], cgroup: Path | None = None) -> Sample:
    """Run ``cmd``; poll its memory every 10 ms; wall, CPU and peaks from the kernel."""
    if cgroup is not None:
        cmd = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh", *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_rss = 0
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):  # the kernel's own high-water mark
                    peak_rss = max(peak_rss, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(wait_status)
    if code != 0 and cgroup is None:
        sys.exit(f"benchmark command failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    # ru_maxrss is not used: across fork+exec it can report the parent's figure.
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(wall, cpu, peak_rss, peak_anon, code, usage.ru_inblock * 512)


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def inputs(model: Model) -> list[Path]:
    return sorted(model.path.glob("*.bin" if model.torch_bin else "*.safetensors"))


#: Per shard, the usual way to turn .bin into safetensors: load it whole (or mapped).
BIN_SCRIPT = """
import pathlib, torch
from safetensors.torch import save_file
out = pathlib.Path({out!r}); out.mkdir(parents=True, exist_ok=True)
for f in {shards!r}:
    state = torch.load(f, weights_only=True, map_location="cpu"{mmap})
    state = {{k: v.to(torch.{dtype}).contiguous() for k, v in state.items()}}
    save_file(state, str(out / pathlib.Path(f).with_suffix(".safetensors").name),
              metadata={{"format": "pt"}})
"""


def contenders(
    model: Model, out: Path, floor_bytes: int, threads: Sequence[int] = ()
) -> dict[str, list[str]]:
    """The commands to time, in the order they run: the floors, the usual scripts for
    this kind of model, then fastcast's CLI and API with the model's options, then the
    CLI at each of ``threads``."""
    shards = [str(p) for p in inputs(model)]
    floor = str(ROOT / "target" / "release" / "examples" / "io_floor")
    flags: list[str] = []
    options: dict[str, object] = {}
    if model.dequantize:
        flags, options = ["--dequantize"], {"dequantize": True}
    if model.quantize:
        flags += ["--quantize", model.quantize]
        options["quantize"] = model.quantize
    cli = [
        sys.executable, "-m", "fastcast.cli", "convert", str(model.path), "-o", str(out),
        "--dtype", model.target, "--shard-size", model.out_shard_size, *flags, "--quiet",
    ]  # fmt: skip
    return {
        "floor (fsync)": [floor, "--fsync", str(out), str(floor_bytes), *shards],
        WRITEBACK_FLOOR: [floor, "--fsync", "--writeback", str(out), str(floor_bytes), *shards],
        "floor (no fsync)": [floor, str(out), str(floor_bytes), *shards],
        **scripts(model, out, shards),
        "fastcast (CLI)": cli,
        "fastcast (API)": python_cmd(
            f"""
            import fastcast
            fastcast.convert({str(model.path)!r}, {model.target!r}, output={str(out)!r},
                             shard_size={model.out_shard_size!r}, progress=False,
                             **{options!r})
            """
        ),
        **{thread_label(n): [*cli, "--threads", str(n)] for n in threads},
    }  # fmt: skip


#: The floor whose fsync overlaps the writing, as fastcast's does (io_floor --writeback);
#: 'floor (fsync)' writes everything, then waits for the disk.
WRITEBACK_FLOOR = "floor (fsync, writeback)"


def thread_label(threads: int) -> str:
    return f"fastcast (CLI, --threads {threads})"


def scripts(model: Model, out: Path, shards: list[str]) -> dict[str, list[str]]:
    """The usual ways to do what fastcast does with ``model``."""
    torch_name = next(d["torch_name"] for d in fastcast.dtypes() if d["name"] == model.target)
    if model.dequantize and model.quantize:  # what a user did before: two runs of fastcast
        fp32 = f"{out}.fp32"
        cli = [sys.executable, "-m", "fastcast.cli", "convert", "--quiet"]
        dequantize = [*cli, str(model.path), "-o", fp32, "--dequantize", "--dtype", "fp32"]
        quantize = [
            *cli,
            fp32,
            "-o",
            str(out),
            "--dtype",
            model.target,
            "--shard-size",
            model.out_shard_size,
            "--quantize",
            model.quantize,
        ]
        steps = [shlex.join(dequantize), shlex.join(quantize), shlex.join(["rm", "-rf", fp32])]
        return {"script": ["bash", "-c", " && ".join(steps)]}  # fmt: skip
    if model.dequantize and model.dtype == "mxfp4":  # what transformers offers
        return {
            "script": python_cmd(
                f"""
                import torch, transformers
                m = transformers.AutoModelForCausalLM.from_pretrained(
                    {str(model.path)!r}, dtype=torch.{torch_name},
                    quantization_config=transformers.Mxfp4Config(dequantize=True))
                m.save_pretrained({str(out)!r}, max_shard_size={model.out_shard_size!r})
                """
            )
        }
    if model.dequantize and model.dtype in ("nvfp4", "w4a16"):
        return {"script": python_cmd(CT_SCRIPT.format(src=str(model.path), out=str(out)))}
    if model.dequantize:
        return {
            "script": python_cmd(
                f"""
                import torch
                from compressed_tensors.entrypoints.convert import convert_checkpoint
                from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer \\
                    import FP8BlockDequantizer
                conv = FP8BlockDequantizer.from_pretrained(
                    {str(model.path)!r}, dtype=torch.{torch_name})
                convert_checkpoint({str(model.path)!r}, {str(out)!r}, conv, device="cpu")
                """
            )
        }
    if model.torch_bin:
        return {
            "script": python_cmd(BIN_SCRIPT.format(out=str(out), shards=shards, mmap="",
                                                   dtype=torch_name)),
            "script (mmap=True)": python_cmd(BIN_SCRIPT.format(
                out=str(out), shards=shards, mmap=", mmap=True", dtype=torch_name)),
        }  # fmt: skip
    if model.quantize:
        return {"script": python_cmd(QUANTIZE_SCRIPT.format(shards=shards, out=str(out)))}
    usual = {
        "script": python_cmd(
            f"""
            import torch, pathlib
            from safetensors.torch import load_file, save_file
            out = pathlib.Path({str(out)!r}); out.mkdir(parents=True, exist_ok=True)
            for f in {shards!r}:
                state = {{k: v.to(torch.{torch_name}) for k, v in load_file(f).items()}}
                save_file(state, str(out / pathlib.Path(f).name), metadata={{"format": "pt"}})
            """
        ),
    }
    if model.tensors is None:  # a flat checkpoint is not a model transformers can build
        usual["transformers"] = python_cmd(
            f"""
            import torch, transformers
            m = transformers.AutoModelForCausalLM.from_pretrained(
                {str(model.path)!r}, dtype=torch.{torch_name})
            m.save_pretrained({str(out)!r}, max_shard_size={model.out_shard_size!r})
            """
        )
    return usual


#: compressed-tensors' own decompressor, shard by shard (what its offline converter runs
#: per module), each dequantized weight written in place of its packed tensors.
CT_SCRIPT = """
import json, pathlib
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
src, out = pathlib.Path({src!r}), pathlib.Path({out!r})
out.mkdir(parents=True, exist_ok=True)
qc = json.loads((src / "config.json").read_text())["quantization_config"]
scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
comp = BaseCompressor.get_value_from_registry(qc["format"])
for f in sorted(src.glob("*.safetensors")):
    state = load_file(str(f))
    for k in [k for k in state if k.endswith(".weight_packed")]:
        x = k.removesuffix(".weight_packed")
        parts = {{k.removeprefix(x + "."): state.pop(k) for k in list(state)
                 if k.startswith(x + ".weight_")}}
        state[x + ".weight"] = comp.decompress(parts, scheme)["weight"]
    save_file(state, str(out / f.name), metadata={{"format": "pt"}})
"""


#: The usual hand-written quantizer: per shard, load it, quantize every decoder Linear
#: (128x128 blocks, s = amax / 448 in fp32, q = e4m3(W / s)) and save it.
QUANTIZE_SCRIPT = """
import pathlib, re, torch
from safetensors.torch import load_file, save_file
out = pathlib.Path({out!r}); out.mkdir(parents=True, exist_ok=True)
linear = re.compile(r"\\.layers\\.\\d+\\..*_proj\\.weight$")
for f in {shards!r}:
    state = {{}}
    for k, w in load_file(f).items():
        if not linear.search(k) or w.shape[0] % 128 or w.shape[1] % 128:
            state[k] = w
            continue
        r, c = w.shape
        x = w.float().reshape(r // 128, 128, c // 128, 128)
        s = x.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
        q = (x / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        state[k] = q.reshape(r, c)
        state[k.removesuffix("weight") + "weight_scale_inv"] = s
    save_file(state, str(out / pathlib.Path(f).name), metadata={{"format": "pt"}})
"""


#: Re-save a generated safetensors checkpoint as torch.save shards, one at a time, with
#: transformers' names and index.
TO_BIN = """
import json, pathlib, shutil, torch
from safetensors.torch import load_file
src, dst = pathlib.Path({src!r}), pathlib.Path({dst!r})
dst.mkdir(parents=True, exist_ok=True)
shards = sorted(src.glob("*.safetensors"))
weight_map = {{}}
for i, f in enumerate(shards, 1):
    name = f"pytorch_model-{{i:05d}}-of-{{len(shards):05d}}.bin"
    state = load_file(str(f))
    weight_map.update(dict.fromkeys(state, name))
    torch.save(state, dst / name)
    del state
index = json.loads((src / "model.safetensors.index.json").read_text())
index["weight_map"] = weight_map
(dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
for f in src.iterdir():
    if f.is_dir():
        shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
    elif f.suffix != ".safetensors" and not f.name.startswith("model.safetensors"):
        shutil.copy(f, dst / f.name)
"""


def make_flat(path: Path, count: int, size: int) -> None:
    """``count`` f32 tensors of equal size, ``size`` bytes in all, in 4 shards with an
    index (``model.layers.N.w``)."""
    from safetensors.numpy import save_file

    numel = size // 4 // count
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(4):
        name = f"model-{s + 1:05d}-of-00004.safetensors"
        ids = range(s * count // 4, (s + 1) * count // 4)
        values = rng.standard_normal(len(ids) * numel).astype(np.float32)
        tensors = {f"model.layers.{i}.w": values[k * numel : (k + 1) * numel]
                   for k, i in enumerate(ids)}  # fmt: skip
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": count * numel * 4}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}')
    print(f"wrote {path}: {count} tensors of {numel} f32 in 4 shards")


def warm(paths: list[Path]) -> None:
    """Read the inputs once so every contender starts from the same warm page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def prepare_contenders() -> None:
    """Build the I/O floor, and compile fastcast's bytecode as installing its wheel does
    (pip compiles it; an editable install under PYTHONDONTWRITEBYTECODE never would, and
    every CLI run would then pay ~0.15 s compiling the package: not what users run)."""
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "fastcast-core", "--example", "io_floor"],
        cwd=ROOT, check=True,
    )  # fmt: skip
    compileall.compile_dir(Path(fastcast.__file__).parent, quiet=1)


def settle() -> None:
    """Flush dirty pages left by the previous run so that it does not bill the next."""
    os.sync()


def run_models(
    models: list[Model], repeats: int, threads: Sequence[int] = ()
) -> dict[str, tuple[dict[str, Row], int]]:
    """Every model's contenders, repeat by repeat across the models too: this machine
    drifts (a run can take twice as long an hour later), so a ratio between two models
    (tensors-100k against tensors-100) means something only when their runs alternate.
    Returns each model's rows and the bytes its output has."""
    setups = []
    for model in models:
        out = CACHE / f"out-{model.name}"
        report = fastcast.convert(
            model.path, model.target, output=out, shard_size=model.out_shard_size,
            overwrite=True, dequantize=model.dequantize, quantize=model.quantize,
            progress=False,
        )  # fmt: skip
        cmds = contenders(model, out, report.bytes_written, threads)
        rows = {label: Row(label) for label in cmds}
        setups.append((model, out, cmds, rows, report.bytes_written))
    for model in models:
        warm(inputs(model))
    for r in range(repeats):
        for model, out, cmds, rows, _ in setups:
            for label, cmd in cmds.items():
                shutil.rmtree(out, ignore_errors=True)
                settle()
                sample = measure(cmd)
                rows[label].samples.append(sample)
                print(
                    f"  [{model.name} {r + 1}/{repeats}] {label:<30} {sample.wall:7.2f} s",
                    flush=True,
                )
    for _, out, _, _, _ in setups:
        shutil.rmtree(out, ignore_errors=True)
    return {model.name: (rows, written) for model, _, _, rows, written in setups}


def paired_ratio(a: Row, b: Row) -> float:
    """The median over repeats of ``a``'s wall time over ``b``'s in the same repeat."""
    return statistics.median(x.wall / y.wall for x, y in zip(a.samples, b.samples, strict=True))


def scaling(model: Model, rows: dict[str, Row], threads: Sequence[int]) -> list[str]:
    """Thread scaling: each count's median wall time, input GB/s and CPU, and its
    speed-up over the first count, paired repeat by repeat."""
    size = sum(p.stat().st_size for p in inputs(model))
    base = rows[thread_label(threads[0])]
    lines = [
        f"### threads ({model.name}, {model.size} {model.dtype} -> {model.target}, "
        f"{os.cpu_count()} cores)",
        "",
        f"| --threads | wall s | GB/s in | CPU s | speed-up over {threads[0]} |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in threads:
        row = rows[thread_label(n)]
        wall = row.median("wall")
        lines.append(
            f"| {n} | {wall:.2f} | {size / wall / 1e9:.2f} | {row.median('cpu'):.2f} "
            f"| {1 / paired_ratio(row, base):.2f}x |"
        )
    return lines


# --- memory cap -----------------------------------------------------------------------


def make_cgroup(limit: int) -> Path | None:
    """A memory cgroup capped at ``limit`` bytes (v1 or v2), or None where unusable."""
    name = f"fastcast-bench-{os.getpid()}"
    try:
        if (CGROUP_V1 / "memory.limit_in_bytes").exists():
            group = CGROUP_V1 / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            return group
        if (CGROUP_V2 / "cgroup.controllers").exists() and "memory" in (
            CGROUP_V2 / "cgroup.subtree_control"
        ).read_text():
            group = CGROUP_V2 / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0")
            return group
    except OSError as e:
        print(f"memory cap: cannot create a memory cgroup ({e}); skipped")
        return None
    print("memory cap: no usable memory cgroup (v1 or v2, as root) here; skipped")
    return None


def remove_cgroup(group: Path) -> None:
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def drop_caches() -> bool:
    """Empty the page cache (root only) so the next run reads from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_capped(model: Model, limit: int, repeats: int) -> list[str]:
    """fastcast with and without the cap, interleaved, from a cold page cache each
    time (so the input's pages are charged to the capped group too); then the usual
    script under the same cap."""
    group = make_cgroup(limit)
    if group is None:
        return ["memory cap: skipped (no usable memory cgroup; needs root and cgroup v1 or v2)"]
    out = CACHE / f"out-{model.name}-capped"
    cmds = contenders(model, out, 0)
    cold = True
    free, capped, script = [], [], []
    try:
        for _ in range(repeats):
            for samples, cgroup in ((free, None), (capped, group)):
                shutil.rmtree(out, ignore_errors=True)
                cold = drop_caches() and cold
                samples.append(measure(cmds["fastcast (CLI)"], cgroup=cgroup))
        shutil.rmtree(out, ignore_errors=True)
        drop_caches()
        script.append(measure(cmds["script"], cgroup=group))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        remove_cgroup(group)
    cache = "cold page cache before each run" if cold else "warm cache (could not drop it)"
    cap = f"{limit >> 20} MiB"
    lines = [f"{cache}; {repeats} interleaved pairs"]
    if all(s.code == 0 for s in capped):
        t_free = statistics.median(s.wall for s in free)
        t_cap = statistics.median(s.wall for s in capped)
        peak = max(s.peak_rss for s in capped) / 2**20
        lines.append(
            f"fastcast under a {cap} cap: finished, {t_cap:.2f} s vs {t_free:.2f} s uncapped "
            f"= {t_cap / t_free:.2f}x (peak RSS {peak:.0f} MiB)"
        )
    else:
        lines.append(
            f"fastcast under a {cap} cap: did NOT finish (exit {[s.code for s in capped]})"
        )
    verdict = (
        "finished" if script[0].code == 0 else f"did NOT finish (exit {script[0].code}, killed)"
    )
    lines.append(f"usual script under the same cap: {verdict}")
    return lines


# --- kernels --------------------------------------------------------------------------


def kernel_speed() -> list[str]:
    """Single-thread cast-kernel throughput in GB/s of input, preallocated buffers."""
    from fastcast import _core

    lines = []
    values = np.random.default_rng(0).standard_normal(32 << 20).astype(np.float32)
    for src, dst in (("F32", "BF16"), ("F32", "F16"), ("BF16", "F16")):
        data = values if src == "F32" else fastcast.cast_array(values, src)
        out = np.empty(len(values) * {"BF16": 2, "F16": 2}[dst], np.uint8)
        raw = data.view(np.uint8)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _core.cast_into(raw, src, out, dst, threads=1)
            times.append(time.perf_counter() - t0)
        lines.append(f"{src}->{dst} {raw.nbytes / min(times) / 1e9:.1f} GB/s/core")
    return lines


# --- report ---------------------------------------------------------------------------


def table(model: Model, rows: dict[str, Row], floor_bytes: int) -> list[str]:
    floor = rows["floor (fsync)"]
    script = rows["script"]
    hf = rows.get("transformers")
    lines = [
        f"### {model.name}: {model.size} {model.dtype} in {model.shard_size} shards -> "
        f"{model.target}, {model.out_shard_size} shards ({floor_bytes / 1e9:.2f} GB out)",
        "",
        "| run | wall s | vs floor | vs script | vs transformers | CPU s | CPU vs floor "
        "| peak RSS MiB | peak anon MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        wall, cpu = row.median("wall"), row.median("cpu")
        vs_hf = f"{wall / hf.median('wall'):.2f}x" if hf else "-"
        lines.append(
            f"| {row.label} | {wall:.2f} | {wall / floor.median('wall'):.2f}x "
            f"| {wall / script.median('wall'):.2f}x | {vs_hf} "
            f"| {cpu:.2f} | {cpu / max(floor.median('cpu'), 1e-3):.2f}x "
            f"| {row.median('peak_rss') / 2**20:.0f} | {row.median('peak_anon') / 2**20:.0f} |"
        )
    return lines


def bench_models(quick: bool, names: list[str], size: str | None = None) -> dict[str, Model]:
    """The benchmark's models by name (300 MB ones with ``quick``, or ``size``)."""
    scale = size or ("300MB" if quick else None)
    models = {
        "llama": Model("llama", "llama", scale or "5GB", "fp32", "2GB" if not scale else "100MB",
                       "BF16", "2GB" if not scale else "50MB"),
        "mixtral": Model("mixtral", "mixtral", scale or "3GB", "bf16",
                         "2GB" if not scale else "100MB", "F16", "2GB" if not scale else "50MB"),
        "deepseek-fp8": Model("deepseek-fp8", "llama", scale or "5GB", "fp8",
                              "2GB" if not scale else "100MB", "BF16",
                              "2GB" if not scale else "50MB", dequantize=True),
        "gpt-oss-mxfp4": Model("gpt-oss-mxfp4", "gpt-oss", scale or "5GB", "mxfp4",
                               "2GB" if not scale else "100MB", "BF16",
                               "5GB" if not scale else "200MB", dequantize=True),
        "nvfp4": Model("nvfp4", "llama", scale or "5GB", "nvfp4",
                       "2GB" if not scale else "100MB", "BF16",
                       "5GB" if not scale else "200MB", dequantize=True),
        "w4a16": Model("w4a16", "llama", scale or "5GB", "w4a16",
                       "2GB" if not scale else "100MB", "BF16",
                       "5GB" if not scale else "200MB", dequantize=True),
        "w4a16-requantize": Model("w4a16-requantize", "llama", scale or "5GB", "w4a16",
                                  "2GB" if not scale else "100MB", "BF16",
                                  "5GB" if not scale else "200MB", dequantize=True,
                                  quantize="fp8", input="w4a16"),
        "llama-quantize": Model("llama-quantize", "llama", scale or "5GB", "bf16",
                                "2GB" if not scale else "100MB", "BF16",
                                "2GB" if not scale else "50MB", quantize="fp8"),
        "llama-copy": Model("llama-copy", "llama", scale or "5GB", "bf16",
                            "2GB" if not scale else "100MB", "BF16",
                            "2GB" if not scale else "50MB", input="llama-quantize"),
        "tensors-100k": Model("tensors-100k", "flat", scale or "400MB", "fp32", "100MB", "BF16",
                              "2GB", tensors=100_000),
        "tensors-100": Model("tensors-100", "flat", scale or "400MB", "fp32", "100MB", "BF16",
                             "2GB", tensors=100),
        "llama-bin": Model("llama-bin", "llama", scale or "5GB", "fp32",
                           "2GB" if not scale else "100MB", "BF16",
                           "2GB" if not scale else "50MB", torch_bin=True),
    }  # fmt: skip
    return {name: models[name] for name in names}


def make_models(chosen: list[Model]) -> None:
    """Generate each model once (streamed, cached in benches/.cache/)."""
    CACHE.mkdir(exist_ok=True)
    for m in chosen:
        made = m.path.with_name(m.path.name + "-st") if m.torch_bin else m.path
        if m.tensors is not None and not (m.path / "config.json").exists():
            make_flat(m.path, m.tensors, fastcast.parse_size(m.size))
        elif not (m.path / "config.json").exists() and not (made / "config.json").exists():
            subprocess.run(
                [sys.executable, str(HERE / "make_model.py"), str(made), "--arch", m.arch,
                 "--size", m.size, "--dtype", m.dtype, "--shard-size", m.shard_size],
                check=True,
            )  # fmt: skip
        if m.torch_bin and not (m.path / "config.json").exists():
            subprocess.run(python_cmd(TO_BIN.format(src=str(made), dst=str(m.path))),
                               check=True)  # fmt: skip
            shutil.rmtree(made)


def ensure_models(names: list[str], quick: bool = False) -> dict[str, Path]:
    """The models ``names``, generated if need be: their folders."""
    chosen = bench_models(quick, names)
    make_models(list(chosen.values()))
    return {name: m.path for name, m in chosen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small models, one repeat (a smoke run)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", help="every model this size instead of its own (e.g. 1GB)")
    parser.add_argument("--models", default="llama,mixtral")
    parser.add_argument("--cap", default="1GiB", help="memory cap for the capped runs")
    parser.add_argument(
        "--threads",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        help="also run the CLI at these thread counts (e.g. 1,4,16) and add a scaling table",
    )
    args = parser.parse_args()
    chosen = list(bench_models(args.quick, args.models.split(","), args.size).values())
    repeats = 1 if args.quick else args.repeats
    prepare_contenders()
    make_models(chosen)
    lines = [
        f"## fastcast conversion benchmark ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, kernel path {fastcast.select_kernel()})",
        "",
        "Medians of interleaved runs; warm page cache; fsync on for fastcast and "
        f"'floor (fsync)' (and '{WRITEBACK_FLOOR}', whose writeback overlaps its reading "
        "as fastcast's does); the scripts do not fsync.",
        "",
    ]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for m in chosen:
        print(f"{m.name}: {m.path}")
    results = run_models(chosen, repeats, args.threads)
    for m in chosen:
        rows, floor_bytes = results[m.name]
        samples[m.name] = {r.label: [vars(s) for s in r.samples] for r in rows.values()}
        lines += [*table(m, rows, floor_bytes), ""]
        if args.threads:
            lines += [*scaling(m, rows, args.threads), ""]
    if {"tensors-100k", "tensors-100"} <= results.keys():
        many, few = results["tensors-100k"][0], results["tensors-100"][0]
        lines += [
            "100k tensors against 100 holding the same bytes, the median of each repeat's "
            "ratio: " + ", ".join(
                f"{label} {paired_ratio(many[label], few[label]):.2f}x"
                for label in ("fastcast (CLI)", "fastcast (API)")
            ),
            "",
        ]  # fmt: skip
    cap = fastcast.parse_size(args.cap)
    capped_model = chosen[0]
    lines += [f"### memory cap ({capped_model.name}, {capped_model.size} input)", ""]
    lines += [f"- {x}" for x in run_capped(capped_model, cap, repeats)]
    lines += ["", "### cast kernels (one thread, in memory)", ""]
    lines += [f"- {x}" for x in kernel_speed()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    # A scaling run is a run of its own (another machine, say): it keeps the main table.
    name = ("convert-quick" if args.quick else "convert") + ("-threads" if args.threads else "")
    name += ".md"
    (RESULTS / name).write_text(text)
    (RESULTS / name.replace(".md", ".json")).write_text(json.dumps(samples, indent=1))
    print(f"written to {RESULTS / name}")


if __name__ == "__main__":
    main()
