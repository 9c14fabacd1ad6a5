"""Dtype names as users type them, everywhere."""

from __future__ import annotations

import pytest

import fastcast


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("BF16", "BF16"),
        ("bf16", "BF16"),
        ("bfloat16", "BF16"),
        ("torch.bfloat16", "BF16"),
        ("fp16", "F16"),
        ("half", "F16"),
        ("torch.float16", "F16"),
        ("fp32", "F32"),
        ("float", "F32"),
        ("Float32", "F32"),
        ("double", "F64"),
        ("fp8_e4m3", "F8_E4M3"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("torch.float8_e5m2", "F8_E5M2"),
        ("e5m2", "F8_E5M2"),
        ("int64", "I64"),
        ("U8", "U8"),
    ],
)
def test_accepted_names(name, expected):
    assert fastcast.parse_dtype(name) == expected


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(fastcast.DtypeError) as info:
        fastcast.parse_dtype("bfloat17")
    message = str(info.value)
    for valid in ("bf16", "float16", "fp32", "fp8_e4m3", "fp8_e5m2", "float64"):
        assert valid in message


def test_every_safetensors_dtype_is_known_and_only_floats_cast():
    known = {d["name"]: d for d in fastcast.dtypes()}
    for name in [
        "BOOL",
        "U8",
        "I8",
        "I16",
        "U16",
        "I32",
        "U32",
        "I64",
        "U64",
        "F16",
        "BF16",
        "F32",
        "F64",
        "C64",
        "F8_E4M3",
        "F8_E5M2",
        "F8_E8M0",
        "F8_E4M3FNUZ",
        "F8_E5M2FNUZ",
        "F4",
        "F6_E2M3",
        "F6_E3M2",
    ]:
        assert name in known
    castable = {n for n, d in known.items() if d["castable"]}
    assert castable == {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
    assert known["F4"]["bits"] == 4 and known["C64"]["bits"] == 64


def test_torch_names_match_torch(torch):
    for d in fastcast.dtypes():
        if d["name"] in ("F4", "F6_E2M3", "F6_E3M2"):
            continue  # packed sub-byte formats: torch names differ by version
        if hasattr(torch, d["torch_name"]):
            assert getattr(torch, d["torch_name"]).itemsize * 8 == d["bits"], d
