"""This checkout against a baseline commit, on the same conversions, interleaved:
did a change make fastcast slower?

    python3 benches/bench_ab.py --baseline ccc0ea7 [--models llama,tensors-100k,deepseek-fp8]
                                [--repeats 5] [--quick]

The baseline is built as a wheel in a git worktree and unpacked
(``tests/same_bytes.py`` does it; cached under ``--work``). Each repeat runs the CLI
once with the baseline on ``PYTHONPATH`` and once with this checkout's installed
fastcast, in alternating order, on bench_convert.py's models (generated once, in
benches/.cache/), warm page cache, fsync on. Prints each side's median wall and CPU
seconds and the ratio head/baseline, per model, and writes
benches/results/ab.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

#: The conversion each bench model gets (bench_convert.py's).
FLAGS = {
    "llama": ["--dtype", "bf16", "--shard-size", "2GB"],
    "tensors-100k": ["--dtype", "bf16", "--shard-size", "2GB"],
    "tensors-100": ["--dtype", "bf16", "--shard-size", "2GB"],
    "deepseek-fp8": ["--dtype", "bf16", "--shard-size", "2GB", "--dequantize"],
    "llama-quantize": ["--dtype", "bf16", "--shard-size", "2GB", "--quantize", "fp8"],
    "llama-copy": ["--dtype", "bf16", "--shard-size", "2GB"],
    "mixtral": ["--dtype", "fp16", "--shard-size", "2GB"],
    "w4a16": ["--dtype", "bf16", "--shard-size", "5GB", "--dequantize"],
    "w4a16-requantize": ["--dtype", "bf16", "--shard-size", "5GB", "--dequantize",
                         "--quantize", "fp8"],
}  # fmt: skip


def warm(model: Path) -> None:
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def timed(model: Path, out: Path, flags: list[str], site: Path | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one CLI conversion."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastcast.cli", "convert", str(model), "-o", str(out),
                    "-q", *flags], check=True, env=env)  # fmt: skip
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    from bench_convert import CACHE, RESULTS, ensure_models
    from same_bytes import build_baseline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--models", default="llama,tensors-100k,tensors-100,deepseek-fp8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small models (300MB)")
    parser.add_argument("--work", default="/tmp/fastcast-same-bytes")
    args = parser.parse_args()
    site = build_baseline(args.baseline, Path(args.work))
    names = args.models.split(",")
    models = ensure_models(names, quick=args.quick)
    lines = [f"## this checkout against {args.baseline} (medians of {args.repeats} "
             "interleaved repeats, warm cache, fsync on)", "",
             "| model | baseline wall s | head wall s | head/baseline | baseline CPU s | "
             "head CPU s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in names:
        model = models[name]
        warm(model)
        out = CACHE / f"ab-out-{name}"
        sides: dict[str, list[tuple[float, float]]] = {"base": [], "head": []}
        for r in range(args.repeats):
            order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
            for side in order:
                sides[side].append(timed(model, out, FLAGS[name], site if side == "base" else None))
        shutil.rmtree(out, ignore_errors=True)
        base = statistics.median(w for w, _ in sides["base"])
        head = statistics.median(w for w, _ in sides["head"])
        ratios = statistics.median(h / b for (h, _), (b, _) in zip(sides["head"], sides["base"],
                                                                   strict=True))  # fmt: skip
        line = (f"| {name} | {base:.2f} | {head:.2f} | {ratios:.3f}x | "
                f"{statistics.median(c for _, c in sides['base']):.2f} | "
                f"{statistics.median(c for _, c in sides['head']):.2f} |")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
