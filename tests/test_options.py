"""One set of options: ``fastcast.convert``, ``ConvertOptions.make``, the typed
``Keywords`` the CLI fills, a jobs file's keys and the CLI's flags name the same knobs
with the same defaults, and the mode is one value."""

from __future__ import annotations

import inspect
import typing

import pytest

import fastcast
from fastcast import cli
from fastcast._batch.jobs import JOB_OPTIONS
from fastcast.options import (
    KEYS,
    Cast,
    ConvertOptions,
    Dequantize,
    KeepQuantized,
    Keywords,
    Quantize,
)


def parameters(f):
    return {
        name: p.default
        for name, p in inspect.signature(f).parameters.items()
        if name not in ("model", "stacklevel")
    }


def test_convert_takes_exactly_the_options_with_the_same_defaults():
    assert parameters(fastcast.convert) == parameters(ConvertOptions.make)


def test_the_typed_keywords_are_the_options():
    assert set(typing.get_type_hints(Keywords)) | {"dtype"} == KEYS


def test_the_cli_hands_over_only_options():
    args = cli.build_parser().parse_args(["convert", "m/"])
    given = cli.convert_options(args)
    assert set(given) <= KEYS
    # Every option a batch's model may set, the CLI sets (output, dtype aside).
    assert JOB_OPTIONS - {"dtype"} <= set(given) | {"threads", "report", "progress"}


@pytest.mark.parametrize(
    ("flags", "mode"),
    [
        ({}, Cast()),
        ({"keep_quantized": True}, KeepQuantized()),
        ({"dequantize": True}, Dequantize()),
        ({"quantize": "fp8"}, Quantize("fp8")),
        ({"quantize": "fp8-channel"}, Quantize("fp8-channel")),
        ({"quantize": "fp8", "dequantize": True}, Quantize("fp8", dequantize=True)),
    ],
)
def test_the_mode_is_one_value(flags, mode):
    options = ConvertOptions.make("bf16", **flags)
    assert options.mode == mode
    assert options.dtype == "BF16"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"keep_quantized": True, "dequantize": True}, "exclude each other"),
        ({"quantize": "fp8", "keep_quantized": True}, "exclude each other"),
        ({"quantize": "int3"}, "quantize must be one of"),
        ({"fp8_overflow": "wrap"}, "fp8_overflow must be"),
        ({"shard_size": "5XB"}, "shard size"),
    ],
)
def test_a_bad_combination_is_one_message(flags, message):
    with pytest.raises(ValueError, match=message):
        ConvertOptions.make("bf16", **flags)


def test_options_are_frozen():
    options = ConvertOptions.make("fp16")
    with pytest.raises(AttributeError):
        options.dtype = "BF16"  # type: ignore[misc]
