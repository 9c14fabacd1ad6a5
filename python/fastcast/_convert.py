"""``fastcast.convert``: a model folder in, a re-typed, re-sharded model folder out.

The options are checked once into a ``ConvertOptions`` (``options.py``); the
conversion itself runs as its steps in ``_conversion/``.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable, Sequence
from typing import Literal, ParamSpec, TypeVar

from fastcast._conversion import ConversionReport, run_conversion
from fastcast.options import DEFAULT_SHARD_SIZE, ConvertOptions

P = ParamSpec("P")
R = TypeVar("R")
#: ``stacklevel`` of a warning raised in ``convert``'s body that names the line that
#: called it (``convert`` runs inside the ``gc_paused`` wrapper: one frame more).
CALLER = 3


def gc_paused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with Python's cyclic garbage collector off. Planning a model of 100k
    tensors makes hundreds of thousands of small, acyclic objects, and the collector,
    triggered by allocation counts, spent a quarter of such a run re-scanning them;
    reference counting frees them all the same, and cycles wait for the next collection."""

    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused


@gc_paused
def convert(
    model: str | os.PathLike[str],
    dtype: str | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    keep: Sequence[str] = (),
    variant: str | None = None,
    keep_quantized: bool = False,
    dequantize: bool = False,
    quantize: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    threads: int | None = None,
    fsync: bool = True,
    max_memory: int | str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    report: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
    merge_lora: str | os.PathLike[str] | None = None,
) -> ConversionReport:
    """Convert a model folder (or one weights file) to ``dtype``, re-sharded.

    The input may hold safetensors or torch.save weights (``pytorch_model.bin`` and its
    shards, ``adapter_model.bin``, a lone ``.pt/.pth/.ckpt``), which are read without
    running pickle; of a training checkpoint the state dict is used (the top level, a
    known key such as ``state_dict``, or ``state_dict_key``), ``strip_prefix``
    (``"module."``) removed from every name. Without ``dtype`` every tensor keeps its
    dtype and config.json is unchanged: a ``.bin`` model becomes the same model in
    safetensors, into ``<model>-safetensors`` by default.

    Float tensors are cast bit-exactly as ``torch.Tensor.to`` would; integer and
    bool tensors are copied, and so are float tensors whose names match a ``keep``
    glob. Weight sets are found at any depth (diffusers' ``unet/``, ``vae/``...) and
    packed like transformers' ``save_pretrained(max_shard_size=shard_size)``;
    config.json dtypes are updated; other files are copied, except weights in other
    formats and variants (``variant="fp16"`` converts ``*.fp16.safetensors`` instead,
    under the plain names). A quantized model (``quantization_config``, or
    quantization tensors) is refused (``QuantizedModelError``) unless
    ``keep_quantized``, which casts only what is not quantization state and keeps the
    quantization byte for byte, or ``dequantize``, which writes a plain model: each
    quantized weight (fp8 with its scales, bitsandbytes 4-bit and LLM.int8, GPTQ, AWQ)
    computed in fp32 as its format's reference computes it and rounded once to
    ``dtype`` (bf16, fp16 or fp32), the quantization state left out,
    ``quantization_config`` removed. ``quantize`` writes a plain model quantized:
    ``"fp8"`` (128x128 blocks, F32 ``weight_scale_inv``, the ``fp8`` config that
    transformers and vLLM read) or ``"fp8-channel"`` (compressed-tensors ``FP8_DYNAMIC``,
    F32 ``weight_scale`` per row); only decoder Linear weights are quantized (``s =
    amax / 448`` per block, ``q = e4m3(W / s)``), every other tensor goes to ``dtype``
    (bf16, fp16 or fp32), and the layers that do not fit the blocks stay in it, listed.
    The output defaults to ``<model>-<dtype>`` beside the input
    (``./<repo>-<dtype>`` for a Hugging Face cache snapshot) and records how it was
    made in ``fastcast.json``. Nothing appears in it until the whole conversion
    succeeded. It must be new or empty unless ``overwrite`` (which replaces only a
    previous conversion's files) or ``resume`` (which finishes an interrupted run, or
    says there is nothing to do). Every overflow and underflow is counted
    (``report.loss``); range-narrowing casts warn (``RangeRiskWarning``) first;
    ``strict`` refuses to put anything in place if a value overflowed (``LossError``).
    ``merge_lora`` (a PEFT LoRA or DoRA adapter folder, or a repo id in the local
    cache) merges the adapter into the weights as PEFT's ``merge_and_unload`` does, each
    merged weight computed in fp32 and rounded once; without ``dtype`` every tensor
    keeps the base's dtype (never fp32 for a bf16 base); the adapter's
    ``modules_to_save`` tensors replace the base's (a resized vocabulary, an untied
    head: config.json follows); a quantized base is merged with ``dequantize``.
    Memory stays bounded (``max_memory`` caps the buffers). Raises a
    ``FastcastError`` subclass, or an ``OSError``, naming the file and the problem.

    >>> report = convert("model/", "bf16", shard_size="5GB")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    options = ConvertOptions.make(
        dtype, output=output, shard_size=shard_size, keep=keep, variant=variant,
        keep_quantized=keep_quantized, dequantize=dequantize, quantize=quantize,
        strict=strict, overwrite=overwrite, resume=resume, threads=threads, fsync=fsync,
        max_memory=max_memory, fp8_overflow=fp8_overflow, report=report, progress=progress,
        state_dict_key=state_dict_key, strip_prefix=strip_prefix, merge_lora=merge_lora,
        stacklevel=CALLER + 1,
    )  # fmt: skip
    return run_conversion(model, options, stacklevel=CALLER)
