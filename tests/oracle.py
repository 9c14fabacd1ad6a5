"""Helpers that ask torch what a cast should give, and build edge-case inputs."""

from __future__ import annotations

import numpy as np

import fastcast

# safetensors name -> (torch dtype attribute, numpy storage dtype of its bits)
TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
BITS = {
    "F64": np.uint64,
    "F32": np.uint32,
    "F16": np.uint16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}
CASTABLE = list(TORCH_NAMES)


def torch_dtype(torch, name: str):
    return getattr(torch, TORCH_NAMES[name])


def torch_bits_dtype(torch, name: str):
    return {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[
        np.dtype(BITS[name]).itemsize * 8
    ]


def to_torch(torch, bits: np.ndarray, name: str):
    """A torch tensor of dtype ``name`` holding exactly ``bits``."""
    signed = bits.view({1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[bits.itemsize])
    return torch.from_numpy(signed.copy()).view(torch_dtype(torch, name))


def from_torch(torch, t, name: str) -> np.ndarray:
    """The raw bits of tensor ``t`` as unsigned integers."""
    return t.contiguous().view(torch_bits_dtype(torch, name)).numpy().view(BITS[name])


def torch_cast_bits(torch, bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    return from_torch(torch, to_torch(torch, bits, src).to(torch_dtype(torch, dst)), dst)


def fastcast_cast_bits(bits: np.ndarray, src: str, dst: str, **kw) -> np.ndarray:
    out = fastcast.cast_array(bits, dst, source=src, **kw)
    return out.view(BITS[dst])


def is_nan_bits(bits: np.ndarray, name: str) -> np.ndarray:
    b = bits.astype(np.uint64)
    if name == "F64":
        return (b & 0x7FFF_FFFF_FFFF_FFFF) > 0x7FF0_0000_0000_0000
    if name == "F32":
        return (b & 0x7FFF_FFFF) > 0x7F80_0000
    if name == "F16":
        return (b & 0x7FFF) > 0x7C00
    if name == "BF16":
        return (b & 0x7FFF) > 0x7F80
    if name == "F8_E4M3":
        return (b & 0x7F) == 0x7F
    if name == "F8_E5M2":
        return (b & 0x7F) > 0x7C
    raise ValueError(name)


def torch_fp8_overflow(torch) -> str:
    """What the installed torch does with 1000.0 → float8_e4m3fn."""
    out = torch.tensor([1000.0]).to(torch.float8_e4m3fn).view(torch.uint8).item()
    return "saturate" if out == 0x7E else "nan"


def assert_same_bits(
    got: np.ndarray, want: np.ndarray, src_bits: np.ndarray, src: str, dst: str, what: str
) -> None:
    """Equal bit for bit, except that any NaN matches any NaN."""
    nan_got, nan_want = is_nan_bits(got, dst), is_nan_bits(want, dst)
    bad = np.nonzero((got != want) & ~(nan_got & nan_want))[0]
    if len(bad):
        i = bad[0]
        raise AssertionError(
            f"{what}: {src}->{dst}: {len(bad)} of {len(got)} elements differ from torch; "
            f"first at {i}: input {int(src_bits[i]):#x} gave {int(got[i]):#x}, "
            f"torch {int(want[i]):#x}"
        )


# --- inputs -----------------------------------------------------------------


def every_value(name: str) -> np.ndarray:
    """Every bit pattern of an 8- or 16-bit dtype."""
    return np.arange(2 ** (np.dtype(BITS[name]).itemsize * 8), dtype=np.uint64).astype(BITS[name])


def values_as_f64(torch, name: str) -> np.ndarray:
    """Every finite value of an 8/16-bit dtype, sorted, as float64."""
    vals = to_torch(torch, every_value(name), name).double().numpy()
    return np.unique(vals[np.isfinite(vals)])


def float_bits(values: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(values, dtype={"F32": np.float32, "F64": np.float64}[name]).view(BITS[name])


def edge_inputs(torch, src: str, dst: str) -> np.ndarray:
    """Bits of ``src`` values on every edge of a cast to ``dst``.

    For an 8/16-bit source: every value. For f32/f64: ±0, subnormal and
    normal extremes, ±inf, quiet and signalling NaNs with payloads, and for
    the target: each value, each rounding tie between neighbours and the
    values one ulp either side, the overflow threshold and its neighbours.
    """
    if src not in ("F32", "F64"):
        return every_value(src)
    ftype = np.float32 if src == "F32" else np.float64
    info = np.finfo(ftype)
    specials = [
        0.0,
        info.smallest_subnormal,
        info.smallest_normal,
        info.max,
        np.inf,
        info.smallest_subnormal * 3,
        info.smallest_normal * (1 - info.eps),
    ]
    bits = [float_bits(np.array(specials), src)]
    if src == "F32":
        nans = [
            0x7F800001,
            0x7FA00000,
            0x7FBFFFFF,
            0x7FC00000,
            0x7FC00001,
            0x7FFFFFFF,
            0x7F812345,
            0x7FD23456,
        ]
    else:
        nans = [
            0x7FF0000000000001,
            0x7FF4000000000000,
            0x7FF8000000000000,
            0x7FFFFFFFFFFFFFFF,
            0x7FF8123456789ABC,
        ]
    bits.append(np.array(nans, dtype=BITS[src]))
    if dst in ("F32", "F64"):
        targets = np.array([], dtype=np.float64)
        if dst == "F32" and src == "F64":
            f32 = np.finfo(np.float32)
            base = np.array([1.0, f32.max, f32.smallest_normal, f32.smallest_subnormal, 3.0e-40])
            # f32's ulp at each base value: 2^(exponent - 23), never below 2^-149.
            ulp = np.maximum(2.0 ** (np.floor(np.log2(base)) - 23), 2.0**-149)
            targets = np.concatenate([base + ulp / 2, base - ulp / 2, base, base + ulp * 1.5])
    else:
        vals = values_as_f64(torch, dst)
        vals = vals[vals >= 0]
        # The value one step past the largest: rounding ties against it
        # decide the overflow threshold.
        beyond = vals[-1] + (vals[-1] - vals[-2])
        grid = np.concatenate([vals, [beyond]])
        mids = (grid[:-1] + grid[1:]) / 2
        targets = np.concatenate([vals, mids, [beyond, beyond * 2, vals[1] / 2, vals[1] / 4]])
    with np.errstate(over="ignore"):
        t = targets.astype(ftype)
    near = np.concatenate([t, np.nextafter(t, ftype(np.inf)), np.nextafter(t, ftype(0))])
    bits.append(near.astype(ftype).view(BITS[src]))
    # Values that need double rounding through f32 to match torch.
    if src == "F64" and dst not in ("F32", "F64"):
        mids64 = targets.astype(np.float64)
        bits.append((mids64 + np.spacing(mids64) * 2**20).view(np.uint64))
    allbits = np.concatenate(bits).astype(BITS[src])
    sign = np.array(1 << (np.dtype(BITS[src]).itemsize * 8 - 1), dtype=np.uint64).astype(BITS[src])
    return np.concatenate([allbits, allbits | sign])


def random_inputs(src: str, n: int, seed: int) -> np.ndarray:
    """Random bits (every class) and normal values across many scales."""
    rng = np.random.default_rng(seed)
    width = np.dtype(BITS[src]).itemsize * 8
    raw = rng.integers(0, 2**width, size=n, dtype=np.uint64).astype(BITS[src])
    if src not in ("F32", "F64"):
        return raw
    ftype = np.float32 if src == "F32" else np.float64
    scales = 10.0 ** rng.integers(-45, 39, size=n)
    with np.errstate(over="ignore"):
        normal = (rng.standard_normal(n) * scales).astype(ftype).view(BITS[src])
    return np.where(rng.random(n) < 0.5, raw, normal).astype(BITS[src])
