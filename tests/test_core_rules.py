"""Rules the core owns and Python reads instead of re-typing: what ``--keep`` keeps
(Python's own ``fnmatch`` is the oracle), dtype short names and ranges, and which
casts can overflow."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastcast import _core

# Small alphabets so that random strings hit the bracket edge cases: "[!]", "[]]",
# "[a-]", "[z-a]", unclosed "[", stars next to sets, dots and slashes.
PATTERN_CHARS = "*?[]!-./abcz"
NAME_CHARS = "[]!-./abcz"

patterns = st.text(PATTERN_CHARS, max_size=10)
names = st.text(NAME_CHARS, max_size=8)


def kept(name: str, keep: list[str]) -> bool:
    return _core.target_dtypes([(name, "F32")], "BF16", keep) == ["F32"]


@settings(max_examples=3000, deadline=None)
@given(name=names, pattern=patterns)
@example(name="z", pattern="[z-a]")
@example(name="q", pattern="[z-a!]")
@example(name="-", pattern="[z-a!-c]")
@example(name="]", pattern="[]]")
@example(name="[!]", pattern="[!]")
@example(name="-", pattern="[a-c-e]")
def test_keep_matches_exactly_as_fnmatchcase(name, pattern):
    assert kept(name, [pattern]) == fnmatch.fnmatchcase(name, pattern)


@settings(max_examples=500, deadline=None)
@given(tensors=st.lists(names, max_size=6), keep=st.lists(patterns, max_size=3))
def test_any_pattern_keeps_and_order_is_preserved(tensors, keep):
    got = _core.target_dtypes([(n, "F32") for n in tensors], "F16", keep)
    want = ["F32" if any(fnmatch.fnmatchcase(n, p) for p in keep) else "F16" for n in tensors]
    assert got == want


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*norm*", "model.layers.0.post_attention_layernorm.weight", True),
        ("*.norm.weight", "model.norm.weight", True),
        ("*.norm.weight", "model.norm.bias", False),
        ("unet/*", "unet/down/0.weight", True),
        ("layers.?.w", "layers.17.w", False),
        ("[!a]*", "b.weight", True),
        ("*.[Ww]eight", "x.Weight", True),
        ("*.WEIGHT", "x.weight", False),  # case-sensitive, as fnmatchcase
        ("é?", "éé", True),  # one character is one Unicode scalar value
        ("[", "[", True),
        ("[]", "[]", True),
    ],
)
def test_keep_explicit_cases(pattern, name, matches):
    assert fnmatch.fnmatchcase(name, pattern) == matches
    assert kept(name, [pattern]) == matches


def test_only_castable_floats_are_retyped():
    tensors = [("w", "F32"), ("n", "BF16"), ("ids", "I64"), ("mask", "BOOL"),
               ("packed", "F4"), ("scale", "F8_E8M0"), ("x", "F8_E4M3")]  # fmt: skip
    assert _core.target_dtypes(tensors, "F16", []) == [
        "F16", "F16", "I64", "BOOL", "F4", "F8_E8M0", "F16"
    ]  # fmt: skip
    assert _core.target_dtypes(tensors, "bf16", ["*"]) == [d for _, d in tensors]


def test_target_dtypes_refuses_unknown_and_uncastable_dtypes():
    with pytest.raises(_core.DtypeError, match=r"unknown dtype .bf16."):
        _core.target_dtypes([("w", "bf16")], "F16", [])  # header names only
    with pytest.raises(_core.DtypeError, match=r"unknown dtype .bf17."):
        _core.target_dtypes([("w", "F32")], "bf17", [])
    with pytest.raises(_core.DtypeError, match="target must be one of"):
        _core.target_dtypes([("w", "F32")], "I8", [])
    with pytest.raises(TypeError):
        _core.target_dtypes([("w", "F32")], "F16", "*norm*")  # type: ignore[arg-type]


def test_dtype_short_names_and_ranges():
    by_name = {d["name"]: d for d in _core.dtypes()}
    assert {n: d["short_name"] for n, d in by_name.items() if d["castable"]} == {
        "F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16",
        "F8_E4M3": "fp8_e4m3", "F8_E5M2": "fp8_e5m2",
    }  # fmt: skip
    assert by_name["F16"]["max"] == 65504.0
    assert by_name["F8_E4M3"]["max"] == 448.0
    assert by_name["F8_E5M2"]["max"] == 57344.0
    assert by_name["BF16"]["max"] == 3.3895313892515355e38
    assert by_name["F64"]["max"] == 1.7976931348623157e308
    for d in by_name.values():
        if not d["castable"]:
            assert d["short_name"] is None and d["max"] is None
        else:
            assert _core.parse_dtype(d["short_name"]) == d["name"]


def test_dtype_ranges_agree_with_torch(torch):
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip
    by_name = {d["name"]: d for d in _core.dtypes()}
    for name, torch_name in names.items():
        dtype = getattr(torch, torch_name, None)
        if dtype is None:
            continue
        assert by_name[name]["max"] == torch.finfo(dtype).max, name


def test_cast_rules():
    f16 = _core.cast_rule("F32", "F16")
    assert f16 == {
        "overflow_from": 65520.0,
        "underflow_to": 2.0**-25,
        "narrows_range": True,
        "saturates": False,
    }
    bf16 = _core.cast_rule("float32", "bf16")  # any accepted names
    assert bf16["overflow_from"] == pytest.approx(3.3961775e38)
    assert not bf16["narrows_range"]  # only rounding at the very top overflows
    e4m3 = _core.cast_rule("F32", "F8_E4M3")
    assert 464.0 < e4m3["overflow_from"] < 464.001 and e4m3["saturates"]
    assert _core.cast_rule("BF16", "F32") == {
        "overflow_from": None,
        "underflow_to": None,
        "narrows_range": False,
        "saturates": False,
    }
    assert _core.cast_rule("BF16", "F16")["narrows_range"]
    assert _core.cast_rule("F64", "F32")["narrows_range"]
    assert not _core.cast_rule("F8_E4M3", "F8_E5M2")["narrows_range"]
    with pytest.raises(_core.DtypeError, match="cannot cast I64 to F16"):
        _core.cast_rule("I64", "F16")
    with pytest.raises(_core.DtypeError, match="unknown dtype"):
        _core.cast_rule("F32", "nope")


def test_cast_rule_thresholds_agree_with_torch(torch):
    """The thresholds are where torch's own cast starts to overflow / underflow."""
    for src, dst in [("float32", "float16"), ("float32", "bfloat16"), ("bfloat16", "float16"),
                     ("float32", "float8_e5m2"), ("float16", "float8_e5m2")]:  # fmt: skip
        rule = _core.cast_rule(src, dst)
        s, d = getattr(torch, src), getattr(torch, dst)
        at = torch.tensor([rule["overflow_from"]], dtype=torch.float64).to(s)
        assert float(at.double()) == rule["overflow_from"], (src, dst)
        below = neighbour(torch, at, -1)
        assert torch.isinf(at.to(d)).all() and torch.isfinite(below.to(d)).all(), (src, dst)
        if rule["underflow_to"] is not None:
            last = torch.tensor([rule["underflow_to"]], dtype=torch.float64).to(s)
            assert float(last.double()) == rule["underflow_to"], (src, dst)
            above = neighbour(torch, last, 1)
            assert float(last.to(d)) == 0.0 and float(above.to(d)) != 0.0, (src, dst)


def neighbour(torch, x, step: int):
    """The float ``step`` bit patterns away from positive ``x``."""
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return (x.view(ints) + step).view(x.dtype)
