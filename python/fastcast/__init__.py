"""fastcast: re-type and re-shard safetensors checkpoints, bit-exact with PyTorch.

The public API lives here; the modules behind it are private (``_convert``,
``_verify``...), and the heavy lifting is in the Rust extension ``fastcast._core``.
Nothing in this package needs torch at run time, except ``verify``.

>>> import numpy as np, fastcast
>>> fastcast.parse_dtype("torch.bfloat16")
'BF16'
>>> fastcast.cast_array(np.array([3.140625], np.float32), "fp16")
array([3.14], dtype=float16)
"""

import importlib
from typing import TYPE_CHECKING

from fastcast._arrays import cast_array
from fastcast._core import (
    DtypeError,
    FastcastError,
    InsufficientSpaceError,
    InvalidCheckpointError,
    InvalidSafetensorsError,
    LossError,
    ModelFolderError,
    OutputExistsError,
    QuantizedModelError,
    __version__,
    available_kernels,
    dtypes,
    parse_dtype,
    read_header,
    select_kernel,
)
from fastcast._units import parse_size

if TYPE_CHECKING:
    from fastcast._batch.run import BatchReport, ModelJob, ModelResult, convert_batch, read_jobs
    from fastcast._conversion import ConversionReport
    from fastcast._convert import convert
    from fastcast._inspect import ModelInspection, inspect
    from fastcast._loss import FastcastWarning, OverflowWarning, RangeRiskWarning, TensorLoss
    from fastcast._verify.verify import VerifyReport, verify

#: Where each name of the API lives, imported on first use: every command starts a
#: Python process, and the planner, batch, inspect and verify modules are most of its
#: start-up; ``fastcast dtypes`` or a conversion need not load what they do not use.
_LAZY = {
    "BatchReport": "fastcast._batch.run",
    "ModelJob": "fastcast._batch.run",
    "ModelResult": "fastcast._batch.run",
    "convert_batch": "fastcast._batch.run",
    "read_jobs": "fastcast._batch.run",
    "ConversionReport": "fastcast._conversion",
    "convert": "fastcast._convert",
    "ModelInspection": "fastcast._inspect",
    "inspect": "fastcast._inspect",
    "FastcastWarning": "fastcast._loss",
    "OverflowWarning": "fastcast._loss",
    "RangeRiskWarning": "fastcast._loss",
    "TensorLoss": "fastcast._loss",
    "VerifyReport": "fastcast._verify.verify",
    "verify": "fastcast._verify.verify",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastcast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BatchReport",
    "ConversionReport",
    "DtypeError",
    "FastcastError",
    "FastcastWarning",
    "InsufficientSpaceError",
    "InvalidCheckpointError",
    "InvalidSafetensorsError",
    "LossError",
    "ModelFolderError",
    "ModelInspection",
    "ModelJob",
    "ModelResult",
    "OutputExistsError",
    "OverflowWarning",
    "QuantizedModelError",
    "RangeRiskWarning",
    "TensorLoss",
    "VerifyReport",
    "__version__",
    "available_kernels",
    "cast_array",
    "convert",
    "convert_batch",
    "dtypes",
    "inspect",
    "parse_dtype",
    "parse_size",
    "read_header",
    "read_jobs",
    "select_kernel",
    "verify",
]
