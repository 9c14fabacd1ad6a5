"""Cast-kernel throughput against torch's own ``Tensor.to`` on the CPU, one thread.

    python benches/cast_kernels.py [--mib 64] [--repeats 7]

Runs fastcast and torch interleaved (A B A B ...) on the same in-memory input
and prints medians in GB/s of input and the ratio. The Rust-only numbers per
kernel path come from ``make bench`` (criterion); the end-to-end conversion
benchmarks against the I/O floor live beside this file once ``convert`` exists.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastcast

PAIRS = [
    ("F32", "BF16"),
    ("F32", "F16"),
    ("BF16", "F16"),
    ("F16", "BF16"),
    ("BF16", "F32"),
    ("F32", "F8_E4M3"),
    ("BF16", "F8_E4M3"),
]
TORCH = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="input size per pair (MiB)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"kernel path: {fastcast.select_kernel()}; one thread; {args.mib} MiB of input")
    print("GB/s of input: median (best) of the interleaved runs")
    print(f"{'pair':<18}{'fastcast':>18}{'torch':>18}{'ratio':>8}")
    for src, dst in PAIRS:
        n = args.mib * 2**20 // np.dtype(STORAGE[src]).itemsize
        base = (rng.standard_normal(n) * 3).astype(np.float32)
        t_src = torch.from_numpy(base).to(TORCH[src])
        if src == "F32":
            a_src = base
        else:
            a_src = fastcast.cast_array(base, src)
        nbytes = t_src.numel() * t_src.element_size()
        times: dict[str, list[float]] = {"fastcast": [], "torch": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fastcast.cast_array(a_src, dst, source=src, threads=1)
            times["fastcast"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            t_src.to(TORCH[dst])
            times["torch"].append(time.perf_counter() - t0)
        fc = nbytes / statistics.median(times["fastcast"]) / 1e9
        tc = nbytes / statistics.median(times["torch"]) / 1e9
        fc_best = nbytes / min(times["fastcast"]) / 1e9
        tc_best = nbytes / min(times["torch"]) / 1e9
        print(
            f"{src + '->' + dst:<18}{fc:>9.2f} ({fc_best:>5.1f}){tc:>11.2f} ({tc_best:>5.1f})"
            f"{fc / tc:>7.1f}x"
        )


if __name__ == "__main__":
    main()
