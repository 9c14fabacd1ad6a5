"""Type stubs for fastcast._core, the Rust extension module (see rust/fastcast-py)."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Final, Literal, NotRequired, TypeAlias, TypedDict, final, type_check_only

import numpy as np
from numpy.typing import NDArray
from typing_extensions import Buffer

#: A row of ``Entries.rows``: name, dtype, shape, file, (begin, end), pickle path.
_EntryRow = tuple[str, str, tuple[int, ...], Path, tuple[int, int], tuple[str, ...] | None]
#: A planned tensor's (source, row, dtype, nbytes, begin, end, role) (``PlainShard.picks``).
_Pick = tuple[int, int, str, int, int, int, str]

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FP8_BLOCK",
    "MAX_HEADER_LEN",
    "PARTIAL_SUFFIX",
    "PLAN_VERSION",
    "QUANTIZE_SCHEMES",
    "STATE_ROLES",
    "SURVIVING_ROLES",
    "UNQUANTIZED_FATES",
    "DtypeError",
    "Entries",
    "ExecStats",
    "FastcastError",
    "Index",
    "InsufficientSpaceError",
    "InvalidCheckpointError",
    "InvalidSafetensorsError",
    "LossError",
    "ModelFolderError",
    "OutputExistsError",
    "PlainRows",
    "PlainShard",
    "QuantizedModelError",
    "ShardRecord",
    "__version__",
    "available_kernels",
    "cast_into",
    "cast_rule",
    "castable_target",
    "dtypes",
    "execute_plan",
    "first_repeat",
    "header_lengths",
    "lay_out",
    "pack",
    "parse_dtype",
    "partial_path",
    "plan_plain",
    "quant_roles",
    "quantize_targets",
    "read_entries",
    "read_header",
    "read_index",
    "read_journal",
    "read_torch_file",
    "scan_plan",
    "select_kernel",
    "set_roles",
    "shard_digest",
    "target_dtypes",
    "tensors_digest",
]

__version__: str
#: The plan format this build reads; a ``Plan`` of another version is refused.
PLAN_VERSION: Final = 1
#: What ends the hidden name of a file still being written (see ``partial_path``).
PARTIAL_SUFFIX: Final = ".fastcast-partial"
#: The largest header safetensors readers accept (100 MB); a shard's must not pass it.
MAX_HEADER_LEN: Final = 100_000_000
#: What ``--quantize`` takes: ``fp8`` (128x128 blocks), ``fp8-channel`` (one scale a row).
QUANTIZE_SCHEMES: Final[tuple[str, ...]]
#: The block of ``--quantize fp8`` (``weight_block_size: [128, 128]``).
FP8_BLOCK: Final = 128
#: Bytes of output a worker makes at a time unless ``max_memory`` says otherwise.
DEFAULT_CHUNK_BYTES: Final = 8388608
#: The roles (``quant_roles``) that mean a model is quantized: all but ``plain`` and
#: ``pinned fp32``.
STATE_ROLES: Final[tuple[str, ...]]
#: The other roles: the tensors a ``--dequantize`` writes as themselves (``plain``,
#: ``pinned fp32``).
SURVIVING_ROLES: Final[tuple[str, ...]]
#: The fates (``quantize_targets``) of decoder Linear weights ``--quantize`` leaves
#: unquantized: ``misfit``, ``fused misfit``, ``kept``, ``router``.
UNQUANTIZED_FATES: Final[tuple[str, ...]]

class FastcastError(Exception):
    """Base class of fastcast's errors."""

class InvalidSafetensorsError(FastcastError):
    """A safetensors file that is corrupt, truncated or hostile."""

class InvalidCheckpointError(FastcastError):
    """A .bin/.pt/.pth file fastcast refuses to read (hostile, corrupt, unsupported)."""

class DtypeError(FastcastError):
    """An unknown dtype name, or a cast fastcast does not perform."""

class ModelFolderError(FastcastError):
    """A model folder that cannot be converted as it is."""

class QuantizedModelError(ModelFolderError):
    """A quantized checkpoint that a plain cast would corrupt."""

class OutputExistsError(FastcastError):
    """The output folder exists and is not empty."""

class InsufficientSpaceError(FastcastError, OSError):
    """Not enough free disk space for the output. An OSError: ``errno`` is ENOSPC
    (or EDQUOT) and ``filename`` the file being written."""

class LossError(FastcastError):
    """A cast would lose range (values overflowed), so nothing was put in place.

    ``tensors`` lists (tensor name, overflow count), worst first.
    """

    tensors: list[tuple[str, int]]
    def __init__(self, message: str, tensors: Iterable[tuple[str, int]] = ()) -> None: ...

@type_check_only
class LossCounts(TypedDict):
    elements: int
    overflow: int
    underflow: int
    nan_in: int
    inf_in: int
    max_abs: float

@type_check_only
class DtypeInfo(TypedDict):
    name: str
    torch_name: str
    aliases: list[str]
    bits: int
    castable: bool
    is_float: bool
    #: ``"bf16"``, ``"fp8_e4m3"``...: folder names and messages; None when not castable.
    short_name: str | None
    #: The largest finite value (e4m3fn: 448); None when not castable.
    max: float | None

@type_check_only
class CastRule(TypedDict):
    #: The smallest finite source magnitude that overflows (to ±inf/NaN, or
    #: saturates to ±448 for e4m3fn); None when nothing can.
    overflow_from: float | None
    #: The largest non-zero source magnitude that becomes 0; None when none can.
    underflow_to: float | None
    #: The target's largest finite value is below half the source's: whole
    #: binades overflow (f32 -> f16), not just rounding at the top (f32 -> bf16).
    narrows_range: bool
    #: Overflow clamps to the largest finite value under the default policy (e4m3fn).
    saturates: bool

@type_check_only
class SourcePlan(TypedDict):
    path: str
    #: Bytes when the plan was made; a file of another size is refused.
    size: int

@type_check_only
class OperandPlan(TypedDict):
    """Another tensor a dequantization reads (a scale), anywhere in the inputs."""

    name: str
    #: Index into ``Plan["sources"]``.
    source: int
    dtype: str
    shape: list[int]
    #: [begin, end) in the source file, header included.
    offsets: tuple[int, int]

@type_check_only
class RowsPlan(TypedDict):
    """A 2-D weight with some rows replaced, each output row the weight's or the
    replacement's, cast to the output dtype (``values/rows.rs``)."""

    #: The replacement rows, ``[len(indices), cols]``.
    rows: OperandPlan
    #: The weight row each replacement row takes.
    indices: list[int]

@type_check_only
class MergePlan(TypedDict):
    """A base weight with a LoRA adapter's update added in f32 (``values/merge.rs``)."""

    #: ``lora_A`` ``[r, cols]`` (transposed: ``[r, rows]``) and ``lora_B`` ``[rows, r]``
    #: (transposed: ``[cols, r]``); a bias (``lora_bias``): no ``lora_A``, and ``b``
    #: ``lora_B``'s bias ``[rows]``.
    a: OperandPlan | None
    b: OperandPlan
    #: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
    scale: float
    #: The update is ``(B @ A)`` transposed (Conv1D, embeddings).
    transpose: bool
    #: DoRA's magnitude vector, one per output feature.
    magnitude: OperandPlan | None
    #: A quantized base weight's dequantization (None: the source is a float weight).
    base: _DequantPlan | None
    #: LoRA on a parameter of stacked experts (PEFT's ``ParamWrapper``): ``a`` is
    #: ``[experts * r, ·]`` grouped by expert, ``b`` ``[·, r * experts]`` interleaved;
    #: the whole update ``[experts * expert_rows, cols]``, of which the output holds the
    #: rows from ``first_row`` on (a base storing its experts one by one). Default 1, the
    #: output's rows, 0.
    experts: NotRequired[int]
    expert_rows: NotRequired[int]
    first_row: NotRequired[int]

@type_check_only
class Fp8ScaledPlan(TypedDict):
    """fp8 values times one scale per ``block`` (rows, columns of the 2-D weight),
    multiplied in fp32, then rounded once to the target."""

    kind: Literal["fp8_scaled"]
    scale: OperandPlan
    block: tuple[int, int]

@type_check_only
class NestedAbsmaxPlan(TypedDict):
    """bitsandbytes double quant: absmax = ``quant_map[absmax_u8] * absmax[b //
    blocksize] + offset`` (a product, then a sum, in fp32)."""

    #: ``x.weight.nested_absmax``, F32.
    absmax: OperandPlan
    #: ``x.weight.nested_quant_map``, 256 F32 values.
    quant_map: OperandPlan
    blocksize: int
    #: ``nested_offset`` of the quant state (held as an f32, as bitsandbytes does).
    offset: float

@type_check_only
class Bnb4Plan(TypedDict):
    """bitsandbytes nf4/fp4: ``quant_map[nibble] * absmax[k // blocksize]`` over the
    flat weight, two codes a byte, high nibble first, whatever the container dtype.
    The tensor's ``shape`` is the original one, from the quant state."""

    kind: Literal["bnb4"]
    #: ``x.weight.absmax``: F32, or U8 codes with ``nested``.
    absmax: OperandPlan
    #: ``x.weight.quant_map``, 16 F32 values.
    quant_map: OperandPlan
    blocksize: int
    nested: NestedAbsmaxPlan | None

@type_check_only
class Int8RowsPlan(TypedDict):
    """bitsandbytes LLM.int8: ``CB * SCB[row] * f32(1 / 127)``, in that order."""

    kind: Literal["int8_rows"]
    #: ``x.SCB``, one F32 per row.
    scb: OperandPlan

@type_check_only
class GptqPlan(TypedDict):
    """GPTQ, 2, 4 or 8 bits: ``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g``
    = ``g_idx[i]`` (or ``i // group_size``), ``z`` the stored zero plus one for v1.
    The tensor is named ``x.weight``, shape ``[out, in]``; its source is ``x.qweight``."""

    kind: Literal["gptq"]
    qzeros: OperandPlan
    scales: OperandPlan
    g_idx: OperandPlan | None
    group_size: int
    bits: int
    #: ``checkpoint_format: gptq`` (v1) stores each zero minus one.
    zero_plus_one: bool

@type_check_only
class AwqPlan(TypedDict):
    """AutoAWQ GEMM, 4 bits, order ``[0, 2, 4, 6, 1, 3, 5, 7]``: ``W[o, i] = scales[i //
    group_size, o] * (q[i, o] - z[i // group_size, o])``, named ``x.weight``, shape
    ``[out, in]``; its source is ``x.qweight``."""

    kind: Literal["awq"]
    qzeros: OperandPlan
    scales: OperandPlan
    group_size: int
    bits: int

@type_check_only
class Fp4Plan(TypedDict):
    """4-bit floats (E2M1, low nibble first) times one scale per ``group`` values along
    the packed axis: MXFP4 (U8 E8M0 ``scale``, ``2^(e-127)``, 255 NaN; no ``global_scale``) or
    NVFP4 (F8_E4M3 ``scale`` and a one-value F32 ``global_scale``: ``q * (s / g)`` with
    ``divide``, compressed-tensors; ``q * (s * g)`` without, ModelOpt), in fp32, then
    rounded once. ``transpose``: each matrix of the packing is written with rows and
    columns swapped (gpt-oss experts); ``positive_zero``: code 8 is +0 (ModelOpt)."""

    kind: Literal["fp4"]
    scale: OperandPlan
    group: int
    global_scale: OperandPlan | None
    divide: bool
    transpose: bool
    #: Pairs and groups run down each matrix's columns: ModelOpt's fused experts
    #: ``[experts, in / 2, out]``, written ``[experts, in, out]``.
    down: bool
    positive_zero: bool

@type_check_only
class CtIntPlan(TypedDict):
    """compressed-tensors integers: ``W[o, i] = scale[o, g] * (q[o, i] - z[o, g])`` in
    fp32, ``g`` = ``g_idx[i]`` (or ``i // group_size``), rounded once. The source is
    ``x.weight_packed`` (I32 words, code ``i`` of a row at bit ``i * bits``, stored plus
    ``2^(bits - 1)``; the tensor is named ``x.weight``) or ``x.weight`` (I8 codes)."""

    kind: Literal["ct_int"]
    #: ``[out, groups]`` (``[out, 1]`` per channel) or one value, F16/BF16/F32.
    scale: OperandPlan
    #: I32 packed along the outputs ``[ceil(out * bits / 32), groups]``, or I8 as the scale.
    zero_point: OperandPlan | None
    g_idx: OperandPlan | None
    bits: int
    group_size: int

#: How a dequantized tensor's values are made (``kind`` says which format).
_DequantPlan = Fp8ScaledPlan | Bnb4Plan | Int8RowsPlan | GptqPlan | AwqPlan | Fp4Plan | CtIntPlan

@type_check_only
class Fp8WeightPlan(TypedDict):
    """The e4m3 values of the source weight: per ``block`` (rows, columns of the 2-D
    weight), ``s = max(amax, 1e-12) / 448`` and ``q = e4m3(clamp(W / s, -448, 448))``,
    in fp32. The tensor has the weight's shape, dtype ``F8_E4M3``."""

    kind: Literal["fp8_weight"]
    block: tuple[int, int]

@type_check_only
class Fp8ScalePlan(TypedDict):
    """The F32 scales of the source weight (``[ceil(rows / block[0]), ceil(cols /
    block[1])]``), run right after ``weight`` (its output name) when in the same shard."""

    kind: Literal["fp8_scale"]
    block: tuple[int, int]
    weight: str
    weight_shape: list[int]

@type_check_only
class TensorPlan(TypedDict):
    #: The output tensor's name and shape (a dequantized one's may differ from its
    #: source's: GPTQ/AWQ ``x.qweight`` becomes ``x.weight``).
    name: str
    shape: Sequence[int]
    #: Index into ``Plan["sources"]``.
    source: int
    src_dtype: str
    dst_dtype: str
    #: [begin, end) in the source file, header included.
    src_offsets: tuple[int, int]
    #: [begin, end) in the output's data buffer.
    dst_offsets: tuple[int, int]
    #: Set when the tensor is dequantized rather than cast (``kind`` says how).
    dequant: NotRequired[_DequantPlan]
    #: Set when the tensor is quantized from its source, a float weight: its values or
    #: its scales (whose source is the weight too).
    quantize: NotRequired[Fp8WeightPlan | Fp8ScalePlan]
    #: Set when a LoRA adapter's update is added to the source, a float weight.
    merge: NotRequired[MergePlan]
    #: Set when some of the source's rows are replaced (PEFT's trainable tokens).
    rows: NotRequired[RowsPlan]

#: A plain tensor (neither dequantized nor quantized) as a row: ``TensorPlan``'s
#: name, shape, source, src_dtype, dst_dtype, src_offsets and dst_offsets, in that
#: order. Quicker to make and to read than the dict: a model may have 100k.
_PlainTensorPlan = tuple[str, Sequence[int], int, str, str, tuple[int, int], tuple[int, int]]

@type_check_only
class ShardPlan(TypedDict):
    #: Output-relative name, as journaled (``unet/model-00001-of-00002.safetensors``).
    name: str
    #: Where the executor writes it (possibly inside a staging folder).
    path: str
    #: ``__metadata__`` to write, in order.
    metadata: list[tuple[str, str]] | None
    #: In the order the header lists them; a plain tensor as a dict or a row.
    tensors: list[TensorPlan | _PlainTensorPlan] | PlainRows

@type_check_only
class Plan(TypedDict):
    """What ``execute_plan``, ``scan_plan`` and ``shard_digest`` run."""

    version: int
    sources: list[SourcePlan]
    shards: list[ShardPlan]

@final
class ShardRecord:
    """A shard as written and journaled."""

    #: Output-relative name (``ShardPlan["name"]``).
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    #: xxh3 over the header and the per-chunk hashes (``shard_digest``).
    @property
    def digest(self) -> int: ...
    #: The chunk size the digest was computed with.
    @property
    def chunk_bytes(self) -> int: ...
    #: Loss counts of the shard's cast tensors, in plan order.
    @property
    def losses(self) -> list[tuple[str, LossCounts]]: ...
    def loss_columns(self) -> tuple[list[str], bytes]:
        """The loss counts as columns, without a dict per tensor: the names in plan
        order, and six native-endian 8-byte columns of ``len(names)`` values each,
        one after the other: ``elements``, ``overflow``, ``underflow``, ``nan_in``,
        ``inf_in`` (unsigned) and ``max_abs`` (a double)."""
    def unchanged(self, path: str | PathLike[Any]) -> bool:
        """Whether ``path`` is provably the file this record was journaled for: the
        run synced it and its size, inode and mtime are still those it had then.
        ``False`` means "compare its digest" (``shard_digest``)."""

@final
class ExecStats:
    """What ``execute_plan`` did."""

    @property
    def tensors_cast(self) -> int: ...
    @property
    def tensors_copied(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_written(self) -> int: ...
    @property
    def shards_written(self) -> int: ...
    #: Loss counts of every cast tensor, in plan order.
    @property
    def losses(self) -> list[tuple[str, LossCounts]]: ...
    #: Every shard written, in plan order.
    @property
    def shards(self) -> list[ShardRecord]: ...

@type_check_only
class HeaderDict(TypedDict):
    metadata: dict[str, str] | None
    tensors: list[tuple[str, str, list[int], tuple[int, int]]]
    data_start: int

@type_check_only
class TorchTensor(TypedDict):
    """A tensor of a torch.save file and where its elements lie."""

    #: safetensors name: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U8 U16 U32 U64 BOOL.
    dtype: str
    shape: list[int]
    #: In elements, as pickled.
    stride: list[int]
    #: The storage key: the zip member ``<prefix>/data/<storage>`` holds its bytes.
    storage: str
    #: In elements.
    storage_offset: int
    #: [begin, end) absolute in the file: the elements when ``contiguous``, else the
    #: smallest range covering every element (``[x, x]`` when there are none).
    offsets: list[int]
    #: Row-major strides (those of size-1 dimensions ignored).
    contiguous: bool

@type_check_only
class TorchEntry(TypedDict):
    """A leaf of the pickled object and the dict keys leading to it (``[]``: the root)."""

    path: list[str]
    #: Set for a tensor (a Parameter is one).
    tensor: NotRequired[TorchTensor]
    #: Set for anything else, described: "int", "float", "str", "bool", "None", "bytes",
    #: "list of 3", "tuple of 2", "empty dict", "dict with non-string keys",
    #: "object argparse.Namespace", "global torch.float16", "storage".
    other: NotRequired[str]

@type_check_only
class TorchFile(TypedDict):
    """What ``read_torch_file`` returns."""

    format: Literal["zip"]
    #: The zip's one folder (``archive``, or the saved file's stem).
    prefix: str
    byteorder: Literal["little"]
    #: The object tree flattened through dicts with string keys, in pickle order.
    entries: list[TorchEntry]
    #: ``<prefix>/data/<n>`` members that no tensor or storage uses.
    unreferenced: list[str]

def parse_dtype(name: str) -> str: ...
def castable_target(name: str) -> str: ...
def dtypes() -> list[DtypeInfo]: ...
def target_dtypes(
    tensors: Sequence[tuple[str, str]],
    target: str,
    keep: Sequence[str],
    *,
    quantized: bool = False,
) -> list[str]:
    """For each (tensor name, safetensors dtype), the dtype it gets converting to
    ``target``: its own when not a castable float, matched by a ``keep`` glob
    (``fnmatch.fnmatchcase`` semantics) or, with ``quantized``, holding quantization
    state (see ``quant_roles``); else ``target``."""

def quant_roles(names: Sequence[str], dtypes: Sequence[str] | None = None) -> list[str]:
    """Each tensor's role in its model's quantization, from every tensor name of the
    model and, given ``dtypes``, what they tell (state of a format fastcast does not
    know: a scale-like float beside fp8 or packed codes): "plain", "quantized weight",
    "scale", "zero point", "group index", "quant state", "pinned fp32" or "unknown
    state"."""

def quantize_targets(
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    target: str | None,
    keep: Sequence[str],
    scheme: str,
) -> list[tuple[str, str, tuple[int, int] | None, tuple[str, list[int]] | None]]:
    """What ``--quantize`` in ``scheme`` (one of ``QUANTIZE_SCHEMES``) makes of each
    (tensor name, safetensors dtype, shape) of a plain model converted to ``target``
    (None: every tensor not quantized keeps its own dtype): (dtype, fate, block,
    scale). The fate is "quantize" (a decoder Linear weight, now
    F8_E4M3, with ``block`` and its F32 scale's (name, shape)), "misfit" (its shape does
    not fit the blocks: cast to ``target``), "fused misfit" (fits, but a weight fused
    with it does not), "kept" (matched by ``keep``: its own dtype), "router" (a router
    gate) or "other" (``target_dtypes`` of a quantized model)."""

def cast_rule(src: str, dst: str) -> CastRule:
    """What casting ``src`` to ``dst`` can lose; DtypeError unless both are castable."""

def available_kernels() -> list[str]: ...
def select_kernel(name: str | None = None) -> str: ...
def cast_into(
    src: Buffer | NDArray[np.uint8],
    src_dtype: str,
    dst: Buffer | NDArray[np.uint8],
    dst_dtype: str,
    *,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    kernel: str | None = None,
    threads: int | None = None,
) -> None: ...
def read_header(path: str | PathLike[Any]) -> HeaderDict: ...
def read_entries(paths: Sequence[Path]) -> list[tuple[dict[str, str] | None, Entries]]:
    """Each safetensors file's metadata and its tensors, held by the core in data
    order, offsets absolute in the file, each path the ``file`` its rows name. The
    headers are read in parallel; on failure, the error of the first failing path."""

@final
class Entries:
    """An input file's tensors in data order, offsets absolute: a safetensors file's
    (``read_entries``) or a torch.save file's as chosen (``Entries(file, rows)``). A
    model may have 100k, asked for as columns or, where objects are needed, as rows."""

    def __new__(
        cls,
        file: Path,
        rows: Sequence[tuple[str, str, Sequence[int], tuple[int, int], Sequence[str]]],
    ) -> Entries:
        """A torch.save file's tensors: (name, dtype, shape, (begin, end), pickle path)."""
    def __len__(self) -> int: ...
    @property
    def file(self) -> Path: ...
    def names(self) -> list[str]: ...
    def rows(self) -> list[_EntryRow]:
        """The rows of ``_source.entries.TensorEntry``: (name, dtype, shape, file,
        absolute (begin, end), pickle path or None), in data order."""

@final
class PlainShard:
    """An output shard of ``plan_plain``: tensors cast, copied, quantized,
    dequantized or merged, in data order."""

    def __len__(self) -> int: ...
    @property
    def data_bytes(self) -> int: ...
    @property
    def input_bytes(self) -> int: ...
    @property
    def numel(self) -> int: ...
    def names(self) -> list[str]: ...
    def source_names(self) -> list[str]:
        """Each tensor's name in the set: its source's (a weight's, for its scales),
        merging as the output renames it (a replicated layer's, a replacement's)."""
    def dtypes(self) -> list[str]:
        """The dtype each tensor is written in."""
    def digest(self) -> str:
        """``tensors_digest(self.source_names(), self.dtypes())``."""
    def cast_columns(self) -> tuple[list[str], list[str], list[int]]:
        """Its cast (or copied) tensors' source dtypes, dtypes and source bytes."""
    def quantized(self) -> list[tuple[int, str, str, list[int], tuple[int, int]]]:
        """(position, kind, name, shape, block) of each ``--quantize`` tensor, the kind
        ``fp8_weight`` (the weight's e4m3 values) or ``fp8_scale``."""
    def made(self) -> list[tuple[int, int]]:
        """(position, index) of each tensor made of a dequantized or merged weight
        (written as it is, or quantized from it), ``index`` into the ``dequantize``
        list the plan was made with, then its ``merged`` list."""
    def roles(self) -> list[str]:
        """Each tensor's role in its model's quantization (``quant_roles``' names)."""
    def picks(self) -> list[_Pick]:
        """(source, row, dtype, nbytes, begin, end, role) of each tensor: ``source``
        indexes the ``Entries`` planned, ``row`` their rows."""
    def plan_rows(self, source_ids: list[int], recipes: list[dict[str, Any]] = ...) -> PlainRows:
        """Its tensors as a plan's ``tensors``, ``source_ids[i]`` the plan's id of the
        ``i``th ``Entries`` planned; ``recipes`` the fields each dequantized tensor's
        row adds (``made()``'s order: its ``dequant``, ``merge`` or ``rows``)."""

@final
class PlainRows:
    """A planned shard's tensors as a plan's ``tensors``: the core reads them from its
    table; iterated or pickled, they are the rows they stand for (a quantized
    tensor's a dict)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[_PlainTensorPlan | TensorPlan]: ...
    def __reduce__(
        self,
    ) -> tuple[type[list[Any]], tuple[list[_PlainTensorPlan | TensorPlan]]]: ...
    def rows(self) -> list[_PlainTensorPlan | TensorPlan]: ...

def plan_plain(
    sources: list[Entries],
    target: str | None,
    keep: list[str],
    limit: int,
    *,
    quantized: bool = False,
    quantize: str | None = None,
    dequantize: list[tuple[int, str, list[int], str]] | None = None,
    merged: list[tuple[int, str, list[int]]] | None = None,
    view: tuple[list[tuple[int, int, int, int, str | None]], list[tuple[int, int, str, str]]]
    | None = None,
) -> list[PlainShard]:
    """The shards of a weight set, packed as huggingface_hub packs them (a weight with
    its scales) and laid out as ``lay_out`` does; ``target`` None keeps every dtype, a
    float matching a ``keep`` glob keeps its own, and with ``quantized`` so does every
    tensor holding quantization state; ``quantize`` (a scheme) rules as
    ``quantize_targets``; ``dequantize`` lists (tensor, name, shape, dtype) of each
    weight written dequantized in the place of the set's ``tensor``th, the rest of the
    state left out. Merging an adapter (the adapter's file the last of ``sources``),
    ``view`` gives the set's tensors: each one's (rules source, rules row, values
    source, values row, name or None), then each added one's (source, row, name,
    dtype); ``merged`` lists (tensor, name, shape) of each weight whose values are
    merged (its dtype the rule's)."""

def pack(sizes: list[int], limit: int) -> list[list[int]]:
    """Item indices of each shard of at most ``limit`` bytes, as huggingface_hub's
    splitter packs ``sizes`` (an item over ``limit`` alone, before the shard being
    filled)."""

def lay_out(tensors: list[tuple[str, int]]) -> list[tuple[int, int, int]]:
    """(index, begin, end) of each (dtype, bytes) in data order: widest dtype first,
    stable, end to end from 0."""

def tensors_digest(names: Sequence[str], dtypes: Sequence[str]) -> str:
    """A digest (xxh3-128, hex) of tensors' source names and the dtypes they are
    written in, in order: what a resumed run must share with the run it finishes."""

def read_index(path: str | PathLike[Any]) -> Index:
    """The index json of a sharded checkpoint (its ``weight_map``) as the core's
    table. ``ModelFolderError`` naming the index when it is not JSON or has no
    ``weight_map`` of names to file names; the last of repeated keys wins, as with
    ``json.load``."""

#: A file's tensor names as the name checks take them: its ``Entries`` (no Python
#: string per tensor) or a list.
_FileNames: TypeAlias = Entries | Sequence[str]

@final
class Index:
    """An index's files, in name order, each with the tensors it holds in map order."""

    def __len__(self) -> int: ...
    def files(self) -> list[str]: ...
    def tensors(self, file: str) -> list[str]:
        """``KeyError`` for a file it does not name."""
    def cross_check(
        self, files: Sequence[_FileNames]
    ) -> tuple[Literal["missing", "unlisted"], int, str, int] | None:
        """Checked against the names each file it names holds (in ``files()`` order):
        None, or ``("missing", file position, first name, count)`` for the first file
        lacking a tensor it names, or ``("unlisted", file position, first name, count
        in all)`` for tensors the files hold that it does not name."""

def first_repeat(files: Sequence[_FileNames]) -> tuple[str, int, int] | None:
    """The first tensor of ``files`` (a weight set's, in order) that an earlier file,
    or the same one earlier, also holds: ``(name, file position, earlier position)``."""

def set_roles(files: Sequence[Entries]) -> set[str]:
    """The roles (``quant_roles``, dtypes included) the tensors of a weight set's files
    (their ``Entries``) take, each once."""

def read_torch_file(path: str | PathLike[str]) -> TorchFile:
    """Read a torch.save file (zip format) without running pickle: its tensors as
    absolute byte ranges, its other leaves described. Raises InvalidCheckpointError
    (one line, ``"<path>: <problem>"``) for a file fastcast refuses: legacy or tar
    format, hostile pickle, corrupt zip, unsupported dtype or tensor kind. Never
    falls back to pickle or torch."""

def execute_plan(
    plan: Plan,
    *,
    progress: Callable[[int], object] | None = None,
    threads: int | None = None,
    fsync: bool = True,
    chunk_bytes: int | None = None,
    kernel: str | None = None,
    fp8_overflow: Literal["saturate", "nan"] = "saturate",
    journal: str | PathLike[Any] | None = None,
) -> ExecStats:
    """Write every shard of ``plan`` (partial name, sync, rename to its ``path``,
    journal), with the GIL released. Losses are counted, never refused."""

def scan_plan(
    plan: Plan,
    *,
    progress: Callable[[int], object] | None = None,
    threads: int | None = None,
) -> list[tuple[str, LossCounts]]:
    """What converting would lose, per cast tensor, reading the inputs only."""

def shard_digest(plan: Plan, index: int, chunk_bytes: int) -> int:
    """Shard ``index``'s digest, recomputed from the file at its ``path``."""

def read_journal(path: str | PathLike[Any]) -> list[ShardRecord]:
    """A resume journal's records in order; a torn last line is skipped, a
    missing journal is empty."""

def partial_path(path: str | PathLike[Any]) -> Path:
    """The hidden name ``path`` is written under until complete: ``.NAME`` plus
    ``PARTIAL_SUFFIX``, a long name cut and told apart by a hash (within 255 bytes)."""

def header_lengths(plan: Plan) -> list[int]:
    """The length of each shard's header JSON as the executor will write it (no input
    is read): a shard past ``MAX_HEADER_LEN`` would be unreadable."""
