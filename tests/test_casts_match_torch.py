"""fastcast's casts against torch's ``Tensor.to``, bit for bit, on every pair.

Each pair runs on every kernel path this CPU has (scalar, AVX2, AVX-512), on
every edge class and on random tensors of sizes that are not multiples of
any SIMD width. NaN must give NaN; every other output must equal torch's bits.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastcast
from oracle import (
    CASTABLE,
    assert_same_bits,
    edge_inputs,
    fastcast_cast_bits,
    random_inputs,
    to_torch,
    torch_cast_bits,
    torch_dtype,
    torch_fp8_overflow,
)

PAIRS = [(s, d) for s, d in itertools.product(CASTABLE, CASTABLE) if s != d]
KERNELS = fastcast.available_kernels()
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1000, 65536 * 2 + 13]


@pytest.fixture(scope="module")
def fp8_policy(torch) -> str:
    return torch_fp8_overflow(torch)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_edge_classes_match_torch(torch, fp8_policy, kernel, src, dst):
    bits = edge_inputs(torch, src, dst)
    want = torch_cast_bits(torch, bits, src, dst)
    got = fastcast_cast_bits(bits, src, dst, kernel=kernel, fp8_overflow=fp8_policy)
    assert_same_bits(got, want, bits, src, dst, f"edge classes, {kernel}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_random_tensors_match_torch(torch, fp8_policy, kernel, src, dst):
    for seed, n in enumerate(SIZES):
        bits = random_inputs(src, n, seed)
        want = torch_cast_bits(torch, bits, src, dst)
        got = fastcast_cast_bits(bits, src, dst, kernel=kernel, fp8_overflow=fp8_policy)
        assert_same_bits(got, want, bits, src, dst, f"random, n={n}, {kernel}")


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(0, 100),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
    ),
    st.sampled_from([d for d in CASTABLE if d != "F32"]),
    st.sampled_from(KERNELS),
)
def test_any_f32_array_matches_torch(torch, arr, dst, kernel):
    bits = arr.view(np.uint32)
    want = torch_cast_bits(torch, bits, "F32", dst)
    policy = torch_fp8_overflow(torch)
    got = fastcast_cast_bits(bits, "F32", dst, kernel=kernel, fp8_overflow=policy)
    assert_same_bits(got, want, bits, "F32", dst, f"hypothesis, {kernel}")


def test_default_fp8_overflow_is_torchs(torch):
    """torch >= 2.14 saturates e4m3fn overflow to ±448; fastcast's default does too."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    values = np.array([470.0, 1000.0, np.inf, -np.inf, -1e30, 448.0], np.float32)
    torch_bits = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    if (major, minor) >= (2, 14):
        np.testing.assert_array_equal(fastcast.cast_array(values, "fp8_e4m3"), torch_bits)
    np.testing.assert_array_equal(
        fastcast.cast_array(values, "fp8_e4m3"), [0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7E]
    )
    np.testing.assert_array_equal(
        fastcast.cast_array(values, "fp8_e4m3", fp8_overflow="nan"),
        [0x7F, 0x7F, 0x7F, 0xFF, 0xFF, 0x7E],
    )
    with pytest.raises(ValueError, match="fp8_overflow"):
        fastcast.cast_array(values, "fp8_e4m3", fp8_overflow="clip")  # type: ignore[arg-type]


def test_nan_outputs_are_the_documented_ones():
    nan_bits = np.array([0x7FA00001, 0xFFC12345, 0x7F800001], np.uint32)
    src = nan_bits.view(np.float32)
    np.testing.assert_array_equal(fastcast.cast_array(src, "bf16"), (nan_bits >> 16) | 0x40)
    expect_f16 = ((nan_bits >> 16) & 0x8000) | 0x7E00 | ((nan_bits >> 13) & 0x3FF)
    for kernel in KERNELS:
        got = fastcast.cast_array(src, "fp16", kernel=kernel).view(np.uint16)
        np.testing.assert_array_equal(got, expect_f16)
    np.testing.assert_array_equal(fastcast.cast_array(src, "fp8_e4m3"), [0x7F, 0xFF, 0x7F])
    np.testing.assert_array_equal(fastcast.cast_array(src, "fp8_e5m2"), [0x7F, 0xFF, 0x7F])


def test_f64_rounds_through_f32_like_torch(torch):
    """torch casts f64 to 16-bit and fp8 via f32, rounding twice; so does fastcast."""
    x = np.array([1 + 2**-8 + 2**-40], np.float64)  # a bf16 tie once rounded to f32
    assert fastcast.cast_array(x, "bf16")[0] == 0x3F80  # the double-rounded answer
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).item()
    assert want == 0x3F80


def test_shapes_layouts_and_byte_order_are_handled(torch):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 1.1
    out = fastcast.cast_array(a, "bf16")
    assert out.shape == (2, 3, 4) and out.dtype == np.uint16
    t = to_torch(torch, out, "BF16").float().numpy()
    np.testing.assert_array_equal(t, torch.from_numpy(a).bfloat16().float().numpy())
    transposed = a.transpose(2, 0, 1)
    np.testing.assert_array_equal(
        fastcast.cast_array(transposed, "fp16"), transposed.astype(np.float16)
    )
    big_endian = a.astype(">f4")
    np.testing.assert_array_equal(fastcast.cast_array(big_endian, "fp16"), a.astype(np.float16))
    scalar = np.float32(2.5).reshape(())
    assert fastcast.cast_array(scalar, "f64").shape == ()
    assert fastcast.cast_array(np.zeros((0, 5), np.float32), "bf16").shape == (0, 5)


def test_results_have_the_target_storage_and_are_viewable_in_torch(torch):
    a = np.array([0.1, -2.0, 3e5], np.float32)
    for dst in CASTABLE:
        out = fastcast.cast_array(a, dst)
        back = to_torch(torch, out.view(out.dtype), dst)
        assert back.dtype == torch_dtype(torch, dst)


def test_ml_dtypes_arrays_are_recognised():
    from conftest import require

    ml_dtypes = require("ml_dtypes")
    a = np.array([1.5, -3.25, 1000.0], np.float32)
    bf = a.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(fastcast.cast_array(bf, "f32"), bf.astype(np.float32))
    e4 = a.astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(fastcast.cast_array(e4, "f32"), e4.astype(np.float32))


def test_raw_bits_need_a_source_dtype():
    bits = np.array([0x3F80], np.uint16)
    with pytest.raises(fastcast.DtypeError, match="pass source="):
        fastcast.cast_array(bits, "f32")
    assert fastcast.cast_array(bits, "f32", source="bf16")[0] == 1.0
    with pytest.raises(fastcast.DtypeError, match="does not match"):
        fastcast.cast_array(bits, "f32", source="fp32")
    with pytest.raises(fastcast.DtypeError, match="not a floating-point dtype"):
        fastcast.cast_array(np.ones(2, np.float32), "int8")
    with pytest.raises(fastcast.DtypeError, match=r"unknown dtype .bf17.*bfloat16"):
        fastcast.cast_array(np.ones(2, np.float32), "bf17")


def test_thread_count_does_not_change_results():
    a = np.random.default_rng(7).standard_normal(300_001).astype(np.float32)
    one = fastcast.cast_array(a, "bf16", threads=1)
    np.testing.assert_array_equal(one, fastcast.cast_array(a, "bf16", threads=3))
    np.testing.assert_array_equal(one, fastcast.cast_array(a, "bf16"))


def test_kernel_is_chosen_by_env_var_or_argument():
    def selected(env_value: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FASTCAST_KERNEL": env_value}
        code = (
            "import fastcast, numpy as np; print(fastcast.select_kernel()); "
            "fastcast.cast_array(np.ones(3, np.float32), 'bf16')"
        )
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
        )

    r = selected("scalar")
    assert r.returncode == 0 and r.stdout.strip() == "scalar", r.stderr
    r = selected("sse9")
    assert r.returncode != 0 and 'kernel "sse9" is not available' in r.stderr
    assert fastcast.select_kernel("scalar") == "scalar"
    assert fastcast.select_kernel("auto") == KERNELS[-1]
