"""fastcast against its peers, in the same interleaved runs.

    python3 benches/bench_peers.py [--size 1GB] [--repeats 3] [--only pth,fp8-dequant,...]

Pairs (each with the I/O floor, rust/fastcast-core/examples/io_floor.rs, on the same
input and output bytes):

  pth           a torch.save (zip) fp32 Llama state dict in one .pth -> safetensors, no
                dtype change: anamnesis' `amn remember FILE -o OUT` against
                `fastcast convert FILE -o OUT` (with and without --no-fsync: amn does not
                fsync, so the fair pair is --no-fsync)
  fp8-dequant   a single-file DeepSeek-style block-fp8 Llama (e4m3, an F32
                weight_scale_inv per 128x128) -> bf16: `amn remember FILE --to bf16`
                against `fastcast convert FOLDER --dequantize --dtype bf16 --no-fsync`
  gptq-dequant  the same with a single-file 4-bit group-128 fp16 GPTQ Llama (AutoGPTQ's
                packing, checkpoint_format gptq)
  awq-dequant   the same with an AutoAWQ GEMM one
  bnb-dequant   the same with a bitsandbytes nf4 double-quant bf16 one
  fp8-block     a bf16 Llama folder -> fp8 128x128 blocks: llm-compressor's
                model_free_ptq(scheme="FP8_BLOCK") against `fastcast convert FOLDER
                --quantize fp8 --dtype bf16 --no-fsync`
  fp8-channel   the same folder -> fp8 with one scale per row: model_free_ptq
                (scheme="FP8_DYNAMIC") against `--quantize fp8-channel`

Both sides of every pair run on all cores (amn's default is min(cores, 4)), with a warm
page cache. After the timed runs, each pair's last outputs are checked: the lossless
pairs tensor by tensor, bit for bit, and the quantizing pairs by their error against
the bf16 source (dequantized weight vs source) on a few weights, and how many fp8 codes
and scales the two quantizers share. Peers are installed on demand (anamnesis with
cargo install; llmcompressor with pip, into /tmp/peers-venv where installing it into
this python would downgrade torch or transformers); a peer that cannot be had is
skipped with one line. The tables go to stdout and benches/results/peers-<time>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench_convert import (
    CACHE,
    HERE,
    ROOT,
    Row,
    measure,
    prepare_contenders,
    python_cmd,
    settle,
    warm,
)

import fastcast
from fastcast._units import parse_size

if TYPE_CHECKING:
    import torch

VENV = Path("/tmp/peers-venv")
CARGO_BIN = Path.home() / ".cargo" / "bin"
PAIRS = ("pth", "fp8-dequant", "gptq-dequant", "awq-dequant", "bnb-dequant", "fp8-block",
         "fp8-channel")  # fmt: skip
#: The dequantizing pairs: what make_model.py writes, and how the input is described.
DEQUANT = {
    "fp8-dequant": ("fp8", "block-fp8 Llama (e4m3 + F32 weight_scale_inv per 128x128)"),
    "gptq-dequant": ("gptq", "4-bit group-128 fp16 GPTQ Llama (AutoGPTQ packing)"),
    "awq-dequant": ("awq", "4-bit group-128 fp16 AWQ GEMM Llama (AutoAWQ packing)"),
    "bnb-dequant": ("bnb-nf4", "bitsandbytes nf4 double-quant bf16 Llama"),
}
#: The row every other row of a pair is compared with.
FASTCAST = "fastcast (CLI, --no-fsync)"

#: A .pth as training code saves one: the whole state dict through torch.save.
TO_PTH = """
import pathlib, torch
from safetensors.torch import load_file
src = sorted(pathlib.Path({src!r}).glob("*.safetensors"))
state = {{}}
for f in src:
    state.update(load_file(str(f)))
torch.save(state, {dst!r})
"""

#: llm-compressor's model-free path as its examples call it, on the CPU. Only the
#: decoder Linears are quantized, as fastcast does: embeddings, lm_head and router
#: gates are ignored (norms are not Linear weights).
PTQ_SCRIPT = """
from llmcompressor import model_free_ptq
model_free_ptq(model_stub={src!r}, save_directory={out!r}, scheme={scheme!r},
               ignore=["lm_head", "re:.*embed_tokens$", "re:.*gate$"],
               max_workers={workers}, device="cpu")
"""


@dataclass
class Pair:
    """One comparison: the commands to time, where each writes, how to check them."""

    name: str
    title: str
    cmds: dict[str, list[str]]
    outputs: dict[str, Path]
    check: Callable[[dict[str, Path]], list[str]]
    notes: list[str]


# --- peers ----------------------------------------------------------------------------


def find_amn() -> tuple[str | None, str]:
    """The amn binary (cargo-installed here if missing) and its version, or None and
    why not."""
    amn = shutil.which("amn") or (str(CARGO_BIN / "amn") if (CARGO_BIN / "amn").exists() else None)
    if amn is None:
        print("anamnesis: not installed; cargo install anamnesis --features cli,pth,gptq,awq,bnb")
        for extra in (["--locked"], []):
            done = subprocess.run(
                ["cargo", "install", "anamnesis", "--features", "cli,pth,gptq,awq,bnb", *extra],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                break
        else:
            return None, f"cargo install failed: {done.stderr.strip().splitlines()[-1:]}"
        amn = str(CARGO_BIN / "amn")
    version = subprocess.run([amn, "--version"], capture_output=True, text=True).stdout.strip()
    return amn, version


def downgrades(python: str, package: str) -> list[str]:
    """What ``pip install package`` would replace among torch and transformers."""
    done = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", package],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return ["(pip --dry-run failed)"]
    report = json.loads(done.stdout)
    names = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    return [f"{n} {names[n]}" for n in ("torch", "transformers") if n in names]


def llmcompressor_version(python: str) -> str | None:
    done = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, llmcompressor; "
            "print(m.version('llmcompressor'), 'torch', m.version('torch'), "
            "'compressed-tensors', m.version('compressed-tensors'))",
        ],
        capture_output=True,
        text=True,
    )
    # llm-compressor logs to stdout on import: the versions are the last line.
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else None


def find_llmcompressor() -> tuple[str | None, str]:
    """A python that imports llmcompressor (this one, else /tmp/peers-venv, installed on
    demand without touching this one's torch or transformers) and the versions, or None
    and why not."""
    venv_python = str(VENV / "bin" / "python")
    for python in (sys.executable, venv_python):
        if Path(python).exists() and (version := llmcompressor_version(python)):
            return python, version
    replaced = downgrades(sys.executable, "llmcompressor")
    if not replaced:
        print("llmcompressor: pip install llmcompressor (into this python)")
        python = sys.executable
    else:
        print(
            f"llmcompressor: would replace {', '.join(replaced)} here; installing it "
            f"into {VENV} instead"
        )
        python = venv_python
        if not Path(python).exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=False)
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "llmcompressor"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None, f"pip install failed: {done.stderr.strip().splitlines()[-1:]}"
    version = llmcompressor_version(python)
    return (python, version) if version else (None, "installed but does not import")


# --- inputs ---------------------------------------------------------------------------


def make_model(path: Path, size: str, dtype: str, shard_size: str = "2GB") -> Path:
    if not (path / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_model.py"),
                str(path),
                "--arch",
                "llama",
                "--size",
                size,
                "--dtype",
                dtype,
                "--shard-size",
                shard_size,
            ],
            check=True,
        )
    return path


def make_pth(size: str) -> Path:
    """An fp32 Llama state dict in one torch.save file."""
    pth = CACHE / f"peers-pth-{size}" / "model.pth"
    if not pth.exists():
        src = make_model(CACHE / f"peers-fp32-{size}", size, "fp32")
        pth.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(python_cmd(TO_PTH.format(src=str(src), dst=str(pth))), check=True)
        shutil.rmtree(src)
    return pth


# --- checks ---------------------------------------------------------------------------


def safetensors_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def tensor_index(path: Path) -> dict[str, Path]:
    """Every tensor name in a safetensors file or folder: the file holding it."""
    from safetensors import safe_open

    where = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            where |= dict.fromkeys(st.keys(), f)
    return where


def load(where: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as st:
        return st.get_tensor(name)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def compare_bits(outputs: dict[str, Path], label: str) -> list[str]:
    """``label``'s output against fastcast's, every tensor bit for bit."""
    ours, theirs = tensor_index(outputs[FASTCAST]), tensor_index(outputs[label])
    only_ours, only_theirs = sorted(ours.keys() - theirs), sorted(theirs.keys() - ours)
    differ, uncast = [], []
    for n in sorted(ours.keys() & theirs):
        a, b = load(ours, n), load(theirs, n)
        if bits_equal(a, b):
            continue
        # left in the source's dtype by the peer, cast by fastcast (--dtype)
        (uncast if a.dtype != b.dtype and bits_equal(a, b.to(a.dtype)) else differ).append(n)
    same = len(ours.keys() & theirs) - len(differ) - len(uncast)
    lines = [
        f"{label} vs fastcast: {same} of {len(ours.keys() | theirs)} tensors identical bit for bit"
    ]
    for what, names in (
        (f"left in their own dtype by {label}, fastcast's their exact cast", uncast),
        ("differ", differ),
        ("only in fastcast's output", only_ours),
        (f"only in {label}'s output", only_theirs),
    ):
        if names:
            lines.append(
                f"  {len(names)} {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            )
    return lines


def dequantized(
    where: dict[str, Path], weight: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """An fp8 weight times its scale (grid, per row or per tensor) in fp32, the codes,
    the scale in fp32, and the scale's name, dtype and shape as stored."""
    import torch

    q = load(where, weight)
    scale_name = next(n for n in (weight + "_scale", weight + "_scale_inv") if n in where)
    s = load(where, scale_name)
    stored = (
        f"{scale_name.rsplit('.', 1)[-1]} {str(s.dtype).removeprefix('torch.')} {list(s.shape)}"
    )
    s = s.to(torch.float32)
    rows, cols = q.shape
    if s.numel() == 1:
        full = s.reshape(1, 1)
    else:
        s = s.reshape(s.shape[0], -1)
        full = s.repeat_interleave(-(-rows // s.shape[0]), 0)[:rows]
        full = full.repeat_interleave(-(-cols // s.shape[1]), 1)[:, :cols]
    return q.to(torch.float32) * full, q, s, stored


def quantization_errors(source: Path, outputs: dict[str, Path], peer: str) -> list[str]:
    """On a few decoder weights: each quantizer's error against the bf16 source, and
    how many of the peer's fp8 codes and scales equal fastcast's."""
    import torch

    src = tensor_index(source)
    layers = sorted({int(m[1]) for n in src if (m := re.search(r"\.layers\.(\d+)\.", n))})
    picks = [
        f"model.layers.{layers[0]}.self_attn.q_proj.weight",
        f"model.layers.{layers[len(layers) // 2]}.mlp.down_proj.weight",
        f"model.layers.{layers[-1]}.mlp.gate_proj.weight",
    ]
    index = {label: tensor_index(path) for label, path in outputs.items()}
    lines = [
        "| weight | run | scale | mean rel err | max rel err | rel L2 err | zeroed "
        "| fp8 codes = fastcast's | scales = fastcast's |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in picks:
        w = load(src, name).to(torch.float32)
        nonzero = w != 0
        ref = None
        for label in (FASTCAST, peer):
            if name not in index[label] or load(index[label], name).dtype != torch.float8_e4m3fn:
                lines.append(f"| {name} | {label} | not quantized | | | | | | |")
                continue
            d, q, s, stored = dequantized(index[label], name)
            err = (d - w).abs()
            rel = err[nonzero] / w[nonzero].abs()
            zeroed = (d[nonzero] == 0).double().mean()  # why max rel err is 100%
            same_q = same_s = "-"
            if ref is None:
                ref = (q, s)
            else:
                same_q = f"{(q.view(torch.uint8) == ref[0].view(torch.uint8)).double().mean():.4%}"
                same_s = (
                    f"{(s == ref[1]).double().mean():.4%}"
                    if s.shape == ref[1].shape
                    else f"shapes {tuple(s.shape)} vs {tuple(ref[1].shape)}"
                )
            lines.append(
                f"| {name} | {label} | {stored} | {rel.mean():.4%} | {rel.max():.4%} "
                f"| {err.norm() / w.norm():.4%} | {zeroed:.4%} | {same_q} | {same_s} |"
            )
    return lines


# --- pairs ----------------------------------------------------------------------------


def fastcast_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastcast.cli", "convert", *args, "--quiet"]


def floor_cmd(
    inputs: list[Path], out: Path, out_bytes: int, fsync: bool = False, writeback: bool = False
) -> list[str]:
    """The I/O floor: reads every input, writes ``out_bytes`` into ``out``, no cast;
    ``writeback``: its writeback overlapping its reading, as fastcast's does."""
    floor = str(ROOT / "target" / "release" / "examples" / "io_floor")
    sync = (["--fsync"] if fsync else []) + (["--writeback"] if writeback else [])
    return [floor, *sync, str(out), str(out_bytes), *(str(p) for p in inputs)]


def output_bytes(model: Path, **options: object) -> int:
    """What fastcast writes for ``model`` with ``options``: the floor writes as much."""
    out = CACHE / "peers-out" / "sizing"
    report = fastcast.convert(
        model, output=out, overwrite=True, progress=False, fsync=False, **options
    )  # type: ignore[arg-type]
    shutil.rmtree(out)
    return report.bytes_written


def pth_pair(size: str, amn: str | None, skipped: list[str]) -> Pair:
    pth = make_pth(size)
    out = CACHE / "peers-out" / "pth"
    outputs = {
        "floor (fsync)": out / "floor-sync",
        "floor (fsync, writeback)": out / "floor-writeback",
        "floor (no fsync)": out / "floor",
        "fastcast (CLI)": out / "fastcast-sync",
        FASTCAST: out / "fastcast",
    }
    out_bytes = output_bytes(pth)
    cmds = {
        "floor (fsync)": floor_cmd([pth], outputs["floor (fsync)"], out_bytes, fsync=True),
        "floor (fsync, writeback)": floor_cmd(
            [pth], outputs["floor (fsync, writeback)"], out_bytes, fsync=True, writeback=True
        ),
        "floor (no fsync)": floor_cmd([pth], outputs["floor (no fsync)"], out_bytes),
        "fastcast (CLI)": fastcast_cli(str(pth), "-o", str(outputs["fastcast (CLI)"])),
        FASTCAST: fastcast_cli(str(pth), "-o", str(outputs[FASTCAST]), "--no-fsync"),
    }
    if amn:
        outputs["amn remember"] = out / "amn.safetensors"
        cmds["amn remember"] = [amn, "remember", str(pth), "-o", str(outputs["amn remember"])]
    return Pair(
        "pth",
        f"pth: {pth.stat().st_size / 1e9:.2f} GB fp32 torch.save state dict (one .pth) -> "
        "safetensors, no dtype change",
        cmds,
        outputs,
        lambda o: compare_bits(o, "amn remember") if "amn remember" in o else skipped,
        [],
    )


def dequant_pair(name: str, size: str, amn: str | None, skipped: list[str]) -> Pair:
    """A single-file quantized Llama (``DEQUANT[name]``) -> bf16, against ``amn
    remember --to bf16``; the outputs compared bit for bit."""
    kind, what = DEQUANT[name]
    # a 4-bit file holds half a byte per weight: twice the size asked gives about it
    made = size if kind == "fp8" else f"{2 * parse_size(size)}B"
    src = make_model(CACHE / f"peers-{kind}-{size}", made, kind, shard_size="1000GB")
    (file,) = safetensors_files(src)
    out = CACHE / "peers-out" / name
    outputs = {"floor (no fsync)": out / "floor", FASTCAST: out / "fastcast"}
    out_bytes = output_bytes(src, dtype="bf16", dequantize=True)
    cmds = {
        "floor (no fsync)": floor_cmd([file], outputs["floor (no fsync)"], out_bytes),
        FASTCAST: fastcast_cli(
            str(src), "-o", str(outputs[FASTCAST]), "--dequantize", "--dtype", "bf16", "--no-fsync"
        ),
    }
    if amn:
        outputs["amn remember"] = out / "amn.safetensors"
        cmds["amn remember"] = [
            amn,
            "remember",
            str(file),
            "--to",
            "bf16",
            "-o",
            str(outputs["amn remember"]),
        ]
    return Pair(
        name,
        f"{name}: {file.stat().st_size / 1e9:.2f} GB {what} in one file -> bf16",
        cmds,
        outputs,
        lambda o: compare_bits(o, "amn remember") if "amn remember" in o else skipped,
        [],
    )


def quantize_pair(name: str, size: str, python: str | None, skipped: list[str]) -> Pair:
    src = make_model(CACHE / f"peers-bf16-{size}", size, "bf16")
    scheme, flag = {
        "fp8-block": ("FP8_BLOCK", "fp8"),
        "fp8-channel": ("FP8_DYNAMIC", "fp8-channel"),
    }[name]
    out = CACHE / "peers-out" / name
    outputs = {"floor (no fsync)": out / "floor", FASTCAST: out / "fastcast"}
    out_bytes = output_bytes(src, dtype="bf16", quantize=flag)
    cmds = {
        "floor (no fsync)": floor_cmd(
            safetensors_files(src), outputs["floor (no fsync)"], out_bytes
        ),
        FASTCAST: fastcast_cli(
            str(src),
            "-o",
            str(outputs[FASTCAST]),
            "--quantize",
            flag,
            "--dtype",
            "bf16",
            "--no-fsync",
        ),
    }
    peer = f"llmcompressor model_free_ptq {scheme}"
    if python:
        outputs[peer] = out / "llmcompressor"
        code = PTQ_SCRIPT.format(
            src=str(src), out=str(outputs[peer]), scheme=scheme, workers=os.cpu_count()
        )
        cmds[peer] = [python, "-c", code]
    size_gb = sum(p.stat().st_size for p in safetensors_files(src)) / 1e9
    return Pair(
        name,
        f"{name}: {size_gb:.2f} GB bf16 Llama folder -> fp8 e4m3 decoder Linears "
        f"({'128x128 blocks' if flag == 'fp8' else 'one scale per row'}), the rest bf16",
        cmds,
        outputs,
        lambda o: quantization_errors(src, o, peer) if peer in o else skipped,
        [],
    )


# --- running and reporting ------------------------------------------------------------


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run(pairs: list[Pair], repeats: int) -> dict[str, dict[str, Row]]:
    """Every contender of every pair, repeat by repeat (A B C ... A B C ...); each
    contender's last output is kept for the checks."""
    rows = {p.name: {label: Row(label) for label in p.cmds} for p in pairs}
    for r in range(repeats):
        for pair in pairs:
            for label, cmd in pair.cmds.items():
                remove(pair.outputs[label])
                settle()
                sample = measure(cmd)
                rows[pair.name][label].samples.append(sample)
                if label.startswith("floor"):
                    remove(pair.outputs[label])
                print(
                    f"  [{pair.name} {r + 1}/{repeats}] {label:<42} {sample.wall:7.2f} s",
                    flush=True,
                )
    return rows


def table(pair: Pair, rows: dict[str, Row]) -> list[str]:
    base = rows[FASTCAST].median("wall")
    floor = rows["floor (no fsync)"].median("wall")
    lines = [
        f"### {pair.title}",
        "",
        "| run | wall s | vs fastcast | vs floor | CPU s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        wall = row.median("wall")
        lines.append(
            f"| {row.label} | {wall:.2f} | {wall / base:.2f}x | {wall / floor:.2f}x "
            f"| {row.median('cpu'):.2f} | {max(s.peak_rss for s in row.samples) / 2**20:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB", help="every input about this size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(PAIRS), help=f"among {', '.join(PAIRS)}")
    args = parser.parse_args()
    chosen = args.only.split(",")
    if unknown := set(chosen) - set(PAIRS):
        parser.error(f"unknown pairs {sorted(unknown)}; choose among {', '.join(PAIRS)}")
    prepare_contenders()
    CACHE.mkdir(exist_ok=True)
    versions = [f"fastcast {fastcast.__version__}"]
    amn = python = None
    skip_amn: list[str] = []
    skip_llmc: list[str] = []
    if {"pth", *DEQUANT} & set(chosen):
        amn, why = find_amn()
        versions.append(why if amn else "anamnesis: none")
        skip_amn = [f"anamnesis skipped: {why}"]
        if not amn:
            print(skip_amn[0])
    if {"fp8-block", "fp8-channel"} & set(chosen):
        python, why = find_llmcompressor()
        versions.append(f"llmcompressor {why} ({python})" if python else "llmcompressor: none")
        skip_llmc = [f"llmcompressor skipped: {why}"]
        if not python:
            print(skip_llmc[0])
    pairs = []
    for name in chosen:
        if name == "pth":
            pairs.append(pth_pair(args.size, amn, skip_amn))
        elif name in DEQUANT:
            pairs.append(dequant_pair(name, args.size, amn, skip_amn))
        else:
            pairs.append(quantize_pair(name, args.size, python, skip_llmc))
    shutil.rmtree(CACHE / "peers-out", ignore_errors=True)
    for pair in pairs:
        for label in pair.outputs:
            pair.outputs[label].parent.mkdir(parents=True, exist_ok=True)
    warm(
        sorted(
            {
                f
                for p in pairs
                for cmd in p.cmds.values()
                for f in map(Path, cmd)
                if f.suffix in (".pth", ".safetensors") and f.is_file()
            }
        )
    )
    rows = run(pairs, args.repeats)
    lines = [
        f"## fastcast against its peers ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"kernel path {fastcast.select_kernel()})",
        "",
        f"Versions: {'; '.join(versions)}.",
        "",
        f"Medians of {args.repeats} interleaved runs; warm page cache; every row on all "
        "cores. 'vs fastcast' is against fastcast --no-fsync (the peers do not fsync).",
        "",
    ]
    for pair in pairs:
        lines += [*table(pair, rows[pair.name]), "", *pair.check(pair.outputs), ""]
    shutil.rmtree(CACHE / "peers-out", ignore_errors=True)
    text = "\n".join(lines)
    print("\n" + text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"peers-{time.strftime('%Y%m%d-%H%M')}.md").write_text(text + "\n")
    medians = {
        pair.name: {
            r.label: statistics.median(s.wall for s in r.samples) for r in rows[pair.name].values()
        }
        for pair in pairs
    }
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
