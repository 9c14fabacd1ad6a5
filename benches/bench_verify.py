"""verify's time and memory where its costs show: one very large tensor (its memory must
not grow with the tensor) and a header of very many tensors (its time must not be per
tensor). Each verify runs in a child process that samples its own anonymous memory.

    python3 benches/bench_verify.py [--big 4GiB] [--tensors 740000] [--repeats 3]

Generates (in benches/.cache/):
- ``verify-big``: one fp32 tensor of ``--big`` bytes, converted to fp16;
- ``verify-many``: ``--tensors`` fp32 tensors of 4 values each, converted to bf16;
and reports, per case, verify's wall time and peak RssAnon (median of the repeats), the
conversion's beside it for scale. Results go to benches/results/verify.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"

#: Runs one call in a child process; prints its wall time and peak RssAnon.
CHILD = textwrap.dedent(
    """
    import sys, threading, time
    import fastcast

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    peak, done = [anon()], []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    begun = time.perf_counter()
    if sys.argv[1] == "verify":
        ok = fastcast.verify(sys.argv[2], device="cpu", progress=False).ok
    else:
        fastcast.convert(sys.argv[2], sys.argv[3], output=sys.argv[4], progress=False,
                         fsync=False, overwrite=True)
        ok = True
    seconds = time.perf_counter() - begun
    done.append(1)
    print(ok, seconds, peak[0])
    """
)


def write_one_tensor(path: Path, nbytes: int) -> None:
    """One fp32 tensor of ``nbytes``, written in blocks (never held whole)."""
    n = nbytes // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    raw = header.encode() + b" " * (-len(header) % 8)
    block = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = n
        while left:
            take = min(left, block.size)
            f.write(block[:take].tobytes())
            left -= take
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))


def write_many_tensors(path: Path, count: int) -> None:
    """``count`` fp32 tensors of 4 values, named as a model's are."""
    from safetensors.numpy import save_file

    values = np.random.default_rng(1).standard_normal(4 * count).astype(np.float32)
    state = {f"model.layers.{i // 100}.block.{i % 100}.weight": values[4 * i : 4 * i + 4]
             for i in range(count)}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))


def run(*args: str) -> tuple[bool, float, int]:
    r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                       check=True)  # fmt: skip
    ok, seconds, peak = r.stdout.split()
    return ok == "True", float(seconds), int(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", default="4GiB")
    parser.add_argument("--tensors", type=int, default=740_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from fastcast import parse_size

    big, many = parse_size(args.big), args.tensors
    cases = {
        f"one {args.big} fp32 tensor -> fp16": (
            CACHE / f"verify-big-{args.big}",
            "fp16",
            lambda p: write_one_tensor(p, big),
        ),
        f"{many:,} tensors of 4 fp32 -> bf16": (
            CACHE / f"verify-many-{many}",
            "bf16",
            lambda p: write_many_tensors(p, many),
        ),
    }
    rows = []
    for label, (src, dtype, make) in cases.items():
        if not (src / "config.json").exists():
            make(src)
        out = Path(f"{src}-out")
        convert = [run("convert", str(src), dtype, str(out)) for _ in range(args.repeats)]
        verify = [run("verify", str(out)) for _ in range(args.repeats)]
        assert all(ok for ok, _, _ in verify), f"{label}: verify failed"
        rows.append({
            "case": label,
            "convert_s": statistics.median(s for _, s, _ in convert),
            "convert_anon_mib": statistics.median(p for _, _, p in convert) / 2**20,
            "verify_s": statistics.median(s for _, s, _ in verify),
            "verify_anon_mib": statistics.median(p for _, _, p in verify) / 2**20,
        })  # fmt: skip
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| case | convert s | convert peak anon MiB | verify s | verify peak anon MiB |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['case']} | {r['convert_s']:.1f} | {r['convert_anon_mib']:.0f} | "
              f"{r['verify_s']:.1f} | {r['verify_anon_mib']:.0f} |" for r in rows]  # fmt: skip
    (RESULTS / "verify.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
