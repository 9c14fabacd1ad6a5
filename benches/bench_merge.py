"""``--merge-lora`` benchmark: fastcast against the I/O floor and PEFT's own merge.

    python3 benches/bench_merge.py [--size 5GB] [--rank 64] [--repeats 3] [--cap 1GiB]
        [--quantize fp8] [--no-peft]

A Llama-shaped bf16 base (``make_model.py``, cached in benches/.cache/) and a PEFT
LoRA adapter of rank ``--rank`` on every decoder Linear (q, k, v, o, gate, up, down of
every layer; bf16, written here in PEFT's format: ``adapter_config.json`` and
``adapter_model.safetensors``), merged into a bf16 model. Contenders, interleaved
repeat by repeat, warm page cache:

  floor        reads the base and the adapter, writes as many bytes as the output
               holds, fsyncs (rust/fastcast-core/examples/io_floor.rs): the I/O floor
  fastcast     fastcast convert BASE --merge-lora ADAPTER --dtype bf16 (fsync on)
  peft         AutoModelForCausalLM.from_pretrained(BASE, dtype=bf16) +
               PeftModel.from_pretrained + merge_and_unload() + save_pretrained, the
               usual script (no fsync; left out with --no-peft)

With ``--quantize fp8`` (or fp8-channel) two more: fastcast convert BASE --merge-lora
ADAPTER --quantize fp8 (the merged weights quantized in the same pass), and the floor
for its output's bytes.

Wall, CPU and peak RSS per contender; then fastcast and PEFT each inside a memory
cgroup of ``--cap`` (root, cgroup v1 or v2), from a cold page cache.
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
from pathlib import Path

import ml_dtypes
import numpy as np
from bench_convert import (
    CACHE,
    HERE,
    ROOT,
    Row,
    drop_caches,
    make_cgroup,
    measure,
    prepare_contenders,
    python_cmd,
    remove_cgroup,
    settle,
    warm,
)
from safetensors.numpy import save_file

import fastcast

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, {adapter!r}).merge_and_unload()
model.save_pretrained({out!r}, max_shard_size="5GB")
"""


def make_base(size: str) -> Path:
    base = CACHE / f"merge-base-{size}"
    if not (base / "config.json").exists():
        subprocess.run(
            [sys.executable, str(HERE / "make_model.py"), str(base), "--arch", "llama",
             "--size", size, "--dtype", "bf16", "--shard-size", "2GB"],
            check=True,
        )  # fmt: skip
    return base


def make_adapter(base: Path, rank: int) -> Path:
    """A PEFT LoRA adapter of ``rank`` on every decoder Linear of ``base`` (bf16)."""
    adapter = CACHE / f"{base.name}-lora-r{rank}"
    if (adapter / "adapter_model.safetensors").exists():
        return adapter
    adapter.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(base.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes |= {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (out_f, in_f) in ((k, s) for k, s in shapes.items() if k.endswith(".weight")
                                and k.rsplit(".", 2)[-2] in LINEARS):  # fmt: skip
        module = "base_model.model." + name.removesuffix(".weight")
        a = rng.standard_normal((rank, in_f), dtype=np.float32) / in_f**0.5
        b = rng.standard_normal((out_f, rank), dtype=np.float32) * 0.01
        tensors[f"{module}.lora_A.weight"] = a.astype(ml_dtypes.bfloat16)
        tensors[f"{module}.lora_B.weight"] = b.astype(ml_dtypes.bfloat16)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(LINEARS),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return adapter


def contenders(
    base: Path,
    adapter: Path,
    out: Path,
    floor_bytes: int,
    quantized: tuple[str, int] | None = None,
    peft: bool = True,
) -> dict[str, list[str]]:
    """The commands, by label; ``quantized``: (scheme, output bytes) of a merge that
    --quantize also runs."""
    floor = str(ROOT / "target" / "release" / "examples" / "io_floor")
    shards = [str(p) for p in sorted(base.glob("*.safetensors"))]
    shards.append(str(adapter / "adapter_model.safetensors"))
    merge = [sys.executable, "-m", "fastcast.cli", "convert", str(base), "--merge-lora",
             str(adapter), "-o", str(out), "--quiet"]  # fmt: skip
    cmds = {
        "floor (fsync)": [floor, "--fsync", str(out), str(floor_bytes), *shards],
        "fastcast (CLI)": [*merge, "--dtype", "bf16"],
    }
    if quantized is not None:
        scheme, nbytes = quantized
        cmds[f"floor (fsync, {scheme} output)"] = [floor, "--fsync", str(out), str(nbytes),
                                                   *shards]  # fmt: skip
        cmds[f"fastcast (CLI, --quantize {scheme})"] = [*merge, "--quantize", scheme]
    if peft:
        cmds["peft merge_and_unload"] = python_cmd(
            PEFT_SCRIPT.format(base=str(base), adapter=str(adapter), out=str(out))
        )
    return cmds


def run(cmds: dict[str, list[str]], out: Path, repeats: int) -> dict[str, Row]:
    rows = {label: Row(label) for label in cmds}
    for r in range(repeats):
        for label, cmd in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            settle()
            sample = measure(cmd)
            rows[label].samples.append(sample)
            print(f"  [{r + 1}/{repeats}] {label:<24} {sample.wall:7.2f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def capped(cmds: dict[str, list[str]], out: Path, limit: int) -> list[str]:
    group = make_cgroup(limit)
    if group is None:
        return ["memory cap: skipped (no usable memory cgroup; needs root and cgroup v1 or v2)"]
    lines = []
    try:
        for label in [x for x in ("fastcast (CLI)", "peft merge_and_unload") if x in cmds]:
            shutil.rmtree(out, ignore_errors=True)
            cold = drop_caches()
            s = measure(cmds[label], cgroup=group)
            verdict = (
                f"finished in {s.wall:.2f} s, peak RSS {s.peak_rss / 2**20:.0f} MiB"
                if s.code == 0
                else f"did NOT finish (exit {s.code})"
            )
            cache = "cold cache" if cold else "warm cache"
            lines.append(f"{label} under a {limit >> 20} MiB cap ({cache}): {verdict}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
        remove_cgroup(group)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="5GB")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap", default="1GiB")
    parser.add_argument("--quantize", choices=["fp8", "fp8-channel"],
                        help="also time the merge quantized in the same pass")  # fmt: skip
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT's merge out")
    args = parser.parse_args()
    prepare_contenders()
    CACHE.mkdir(exist_ok=True)
    base = make_base(args.size)
    adapter = make_adapter(base, args.rank)
    out = CACHE / "out-merge"
    report = fastcast.convert(base, "bf16", output=out, merge_lora=adapter, overwrite=True,
                              progress=False)  # fmt: skip
    quantized = None
    if args.quantize:
        q = fastcast.convert(base, output=out, merge_lora=adapter, quantize=args.quantize,
                             overwrite=True, progress=False)  # fmt: skip
        quantized = (args.quantize, q.bytes_written)
    cmds = contenders(base, adapter, out, report.bytes_written, quantized, not args.no_peft)
    warm([*sorted(base.glob("*.safetensors")), adapter / "adapter_model.safetensors"])
    rows = run(cmds, out, args.repeats)
    floor = rows["floor (fsync)"]
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    lines = [
        f"## --merge-lora ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores): "
        f"{size / 1e9:.2f} GB bf16 Llama + rank-{args.rank} LoRA on every decoder Linear "
        f"({report.tensors_merged} weights) -> bf16",
        "",
        "Medians of interleaved runs, warm page cache; fsync on for fastcast and the floor.",
        "",
        "| run | wall s | vs floor | CPU s | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        wall = row.median("wall")
        lines.append(
            f"| {row.label} | {wall:.2f} | {wall / floor.median('wall'):.2f}x "
            f"| {row.median('cpu'):.2f} | {max(s.peak_rss for s in row.samples) / 2**20:.0f} MiB |"
        )
    lines += ["", *[f"- {x}" for x in capped(cmds, out, fastcast.parse_size(args.cap))]]
    text = "\n".join(lines)
    print("\n" + text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"merge-{time.strftime('%Y%m%d-%H%M')}.md").write_text(text + "\n")
    medians = {r.label: statistics.median(s.wall for s in r.samples) for r in rows.values()}
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
