"""torch.save files for the tests, written without torch: a pickle emitter, a zip writer
laid out as torch's ``PyTorchStreamWriter`` lays it out, and knobs to break each rule.

The layout copied (measured on torch 2.15, see shared/reference/torch-checkpoints.md
section 1): one prefix folder; ``data.pkl``, ``.format_version``, ``.storage_alignment``,
``byteorder``, ``data/<key>``, ``version``, ``.data/serialization_id``; every entry stored,
its data at a multiple of 64 (an ``FB`` extra field pads the local header), local headers
with crc = sizes = 0 and flag 0x0808 (a data descriptor follows the data; a 0-byte entry
has flag 0x0800 and none); a ZIP64 end record and locator before the classic one.

    state = {"w": tensor("F32", [1.0, 2.0], (2,))}
    path.write_bytes(torch_file(state))
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- the pickle side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Global:
    """``GLOBAL module name``: a reference to a callable or class, never called here."""

    module: str
    name: str


@dataclass(frozen=True)
class Call:
    """``func args REDUCE``: what unpickling would call (``func(*args)``)."""

    func: Any
    args: tuple[Any, ...]


@dataclass(frozen=True)
class PersId:
    """``value BINPERSID``: torch's storage references (``('storage', ...)``)."""

    value: Any


@dataclass(frozen=True)
class Raw:
    """Opcodes written as they are."""

    data: bytes


@dataclass
class OrderedDictOf:
    """``collections.OrderedDict()`` then SETITEMS, as torch pickles a state dict; with
    ``metadata``, the BUILD that ``Module.state_dict()`` adds (``_metadata``)."""

    items: list[tuple[Any, Any]]
    metadata: bool = False


#: safetensors dtype name -> (legacy storage class, element size); the v3 dtypes below.
STORAGES = {
    "F64": ("DoubleStorage", 8),
    "F32": ("FloatStorage", 4),
    "F16": ("HalfStorage", 2),
    "BF16": ("BFloat16Storage", 2),
    "I64": ("LongStorage", 8),
    "I32": ("IntStorage", 4),
    "I16": ("ShortStorage", 2),
    "I8": ("CharStorage", 1),
    "U8": ("ByteStorage", 1),
    "BOOL": ("BoolStorage", 1),
}
#: Dtypes torch saves through ``_rebuild_tensor_v3`` and an UntypedStorage.
V3 = {
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}


def element_size(dtype: str) -> int:
    return (STORAGES.get(dtype) or V3[dtype])[1]


@dataclass(eq=False)
class Storage:
    """One ``data/<key>`` member and the numel its persistent id declares."""

    key: str
    dtype: str
    data: bytes
    numel: int | None = None
    """Declared numel (elements; bytes for v3); None: the truth."""
    storage_class: Global | None = None
    """Overrides the class the persistent id names."""
    location: str = "cpu"

    def pid(self) -> PersId:
        v3 = self.dtype in V3
        cls = self.storage_class or (
            Global("torch.storage", "UntypedStorage")
            if v3
            else Global("torch", STORAGES[self.dtype][0])
        )
        size = 1 if v3 else element_size(self.dtype)
        numel = self.numel if self.numel is not None else len(self.data) // size
        return PersId(("storage", cls, self.key, self.location, numel))


@dataclass(eq=False)
class Tensor:
    """A tensor as ``_rebuild_tensor_v2`` (or v3) rebuilds it: a view of a storage.
    The same object pickled twice is memoized (BINGET), as a tied weight is."""

    storage: Storage
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None
    offset: int = 0
    parameter: bool = False
    rebuild: Global | None = None
    """Overrides the rebuild function (``_rebuild_sparse_tensor``...)."""
    v3_dtype: Global | None = None
    """Overrides the dtype global of a v3 rebuild (``torch float128``)."""

    def reduce(self) -> Call:
        stride = self.stride if self.stride is not None else contiguous_strides(self.shape)
        hooks = OrderedDictOf([])
        pid = self.storage.pid()
        if self.storage.dtype in V3 or self.v3_dtype is not None:
            dtype = self.v3_dtype or Global("torch", V3[self.storage.dtype][0])
            func = self.rebuild or Global("torch._utils", "_rebuild_tensor_v3")
            args: tuple[Any, ...] = (pid, self.offset, self.shape, stride, False, hooks, dtype)
        else:
            func = self.rebuild or Global("torch._utils", "_rebuild_tensor_v2")
            args = (pid, self.offset, self.shape, stride, False, hooks)
        call = Call(func, args)
        if self.parameter:
            return Call(
                Global("torch._utils", "_rebuild_parameter"), (call, True, OrderedDictOf([]))
            )
        return call


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def pack_values(dtype: str, values: Iterable[float]) -> bytes:
    """Little-endian bytes of ``values`` in ``dtype`` (floats: F32/F64 only; others
    take raw integers: bit patterns for F16/BF16/fp8)."""
    code = {
        "F64": "d", "F32": "f", "F16": "H", "BF16": "H", "I64": "q", "I32": "i", "I16": "h",
        "I8": "b", "U8": "B", "BOOL": "B", "F8_E4M3": "B", "F8_E5M2": "B", "U16": "H",
        "U32": "I", "U64": "Q",
    }[dtype]  # fmt: skip
    vals = list(values)
    return struct.pack(f"<{len(vals)}{code}", *vals)


def tensor(
    dtype: str, values: Iterable[float], shape: tuple[int, ...], key: str = "0", **kw: Any
) -> Tensor:
    """A tensor owning its storage (key ``key``)."""
    return Tensor(Storage(key, dtype, pack_values(dtype, values)), shape, **kw)


class Pickler:
    """Protocol-2 opcodes for a tree of Python values and the classes above, memoizing
    as CPython does (every container and string gets a BINPUT; an object seen twice is
    a BINGET)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # ids stay valid while pickling

    def put(self, obj: Any) -> None:
        n = len(self.memo)
        self.memo[id(obj)] = n
        self.keep.append(obj)
        self.out += b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)

    def get(self, obj: Any) -> bool:
        n = self.memo.get(id(obj))
        if n is None:
            return False
        self.out += b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)
        return True

    def int(self, n: int) -> None:
        if 0 <= n <= 0xFF:
            self.out += b"K" + bytes([n])
        elif 0 <= n <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", n)
        elif -(2**31) <= n < 2**31:
            self.out += b"J" + struct.pack("<i", n)
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def save(self, obj: Any) -> None:
        if isinstance(obj, (str, tuple, list, dict, Tensor, OrderedDictOf)) and self.get(obj):
            return
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self.int(obj)
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
            self.put(obj)
        elif isinstance(obj, bytes):
            self.out += b"B" + struct.pack("<I", len(obj)) + obj
        elif isinstance(obj, Raw):
            self.out += obj.data
        elif isinstance(obj, Global):
            self.out += f"c{obj.module}\n{obj.name}\n".encode()
        elif isinstance(obj, tuple):
            if not obj:
                self.out += b")"
            else:
                if len(obj) <= 3:
                    for x in obj:
                        self.save(x)
                    self.out += b"\x85\x86\x87"[len(obj) - 1 : len(obj)]
                else:
                    self.out += b"("
                    for x in obj:
                        self.save(x)
                    self.out += b"t"
                self.put(obj)
        elif isinstance(obj, list):
            self.out += b"]"
            self.put(obj)
            if obj:
                self.out += b"("
                for x in obj:
                    self.save(x)
                self.out += b"e"
        elif isinstance(obj, dict):
            self.out += b"}"
            self.put(obj)
            self.items(list(obj.items()))
        elif isinstance(obj, OrderedDictOf):
            self.save(Global("collections", "OrderedDict"))
            self.out += b")R"
            self.put(obj)
            self.items(obj.items)
            if obj.metadata:
                self.save({"_metadata": OrderedDictOf([("", {"version": 1})])})
                self.out += b"b"
        elif isinstance(obj, Call):
            self.save(obj.func)
            self.save(obj.args)
            self.out += b"R"
        elif isinstance(obj, PersId):
            self.save(obj.value)
            self.out += b"Q"
        elif isinstance(obj, Tensor):
            self.save(obj.reduce())
            self.put(obj)
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__}")

    def items(self, items: list[tuple[Any, Any]]) -> None:
        if not items:
            return
        self.out += b"("
        for k, v in items:
            self.save(k)
            self.save(v)
        self.out += b"u"


def pickle_bytes(root: Any) -> bytes:
    """``data.pkl`` for ``root``, ending in STOP."""
    p = Pickler()
    p.save(root)
    return bytes(p.out + b".")


def storages_of(root: Any) -> dict[str, Storage]:
    """Every storage the tree references, by key, in the order met."""
    found: dict[str, Storage] = {}

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            found.setdefault(x.storage.key, x.storage)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, OrderedDictOf):
            for _, v in x.items:
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, Call):
            walk(x.args)

    walk(root)
    return found


# --- the zip side --------------------------------------------------------------------------


@dataclass
class Member:
    """One zip entry, and the lies it may tell."""

    name: str
    data: bytes
    method: int = 0
    """0 stored; 8 deflated (``data`` is then compressed here)."""
    local_name: str | None = None
    """The local header's name, if it differs from the central directory's."""
    local_flags: int | None = None
    central_flags: int | None = None
    compressed_size: int | None = None
    """The central directory's compressed size, if it lies."""
    offset: int | None = None
    """The central directory's local-header offset, if it lies."""


@dataclass
class Zip:
    """Knobs on the container as a whole."""

    junk: bytes = b""
    """Bytes before the first entry (a self-extractor stub)."""
    comment: bytes = b""
    entry_count: int | None = None
    """The count both end records give, if it lies."""
    zip64_entry_count: int | None = None
    """The ZIP64 record's count only, if it disagrees with the classic one."""
    zip64_cd_offset: int | None = None
    zip64: bool = True
    extra_eocd: bool = False
    """A second, real-looking classic end record after the first."""


def zip_bytes(members: Sequence[Member], z: Zip | None = None) -> bytes:
    """A zip as torch writes one: stored entries 64-byte aligned with an ``FB`` pad."""
    z = z or Zip()
    out = bytearray(z.junk)
    central = bytearray()
    for m in members:
        data = m.data
        if m.method == 8:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            stored = c.compress(data) + c.flush()
        else:
            stored = data
        crc = zlib.crc32(data)
        local_name = (m.local_name if m.local_name is not None else m.name).encode(
            "utf-8", "surrogatepass"
        )
        flags = 0x0808 if stored else 0x0800
        header_at = len(out)
        pad = -(header_at + 30 + len(local_name) + 4) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 0, m.local_flags if m.local_flags is not None else flags,
            m.method, 0, 0, 0, 0, 0, len(local_name), len(extra),
        ) + local_name + extra  # fmt: skip
        out += stored
        if flags & 0x8:
            out += struct.pack("<IIII", 0x08074B50, crc, len(stored), len(data))
        name = m.name.encode("utf-8", "surrogatepass")
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0,
            m.central_flags if m.central_flags is not None else flags, m.method, 0, 0, crc,
            m.compressed_size if m.compressed_size is not None else len(stored), len(data),
            len(name), 0, 0, 0, 0, 0, m.offset if m.offset is not None else header_at,
        ) + name  # fmt: skip
    cd_offset = len(out)
    out += central
    count = z.entry_count if z.entry_count is not None else len(members)
    if z.zip64:
        z64_at = len(out)
        out += struct.pack(
            "<IQHHIIQQQQ", 0x06064B50, 44, 30, 45, 0, 0,
            z.zip64_entry_count if z.zip64_entry_count is not None else count,
            z.zip64_entry_count if z.zip64_entry_count is not None else count,
            len(central), z.zip64_cd_offset if z.zip64_cd_offset is not None else cd_offset,
        )  # fmt: skip
        out += struct.pack("<IIQI", 0x07064B50, 0, z64_at, 1)
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), cd_offset, len(z.comment)
    )
    out += eocd + z.comment
    if z.extra_eocd:
        out += eocd[:-2] + b"\0\0"
    return bytes(out)


SERIALIZATION_ID = b"1234567890123456789012345678901234567890"


@dataclass
class Layout:
    """The records of a torch.save zip beside the pickle and the storages."""

    prefix: str = "archive"
    byteorder: bytes | None = b"little"
    version: bytes | None = b"3\n"
    extra: list[Member] = field(default_factory=list)
    """Members appended after torch's own (before ``version``)."""


def torch_zip(
    pkl: bytes, storages: Iterable[Storage], layout: Layout | None = None, z: Zip | None = None
) -> bytes:
    """A torch.save zip: ``pkl`` as ``data.pkl`` and each storage as ``data/<key>``."""
    lay = layout or Layout()
    p = lay.prefix
    members = [
        Member(f"{p}/data.pkl", pkl),
        Member(f"{p}/.format_version", b"1"),
        Member(f"{p}/.storage_alignment", b"64"),
    ]
    if lay.byteorder is not None:
        members.append(Member(f"{p}/byteorder", lay.byteorder))
    members += [Member(f"{p}/data/{s.key}", s.data) for s in storages]
    members += lay.extra
    if lay.version is not None:
        members.append(Member(f"{p}/version", lay.version))
    members.append(Member(f"{p}/.data/serialization_id", SERIALIZATION_ID))
    return zip_bytes(members, z)


def torch_file(root: Any, layout: Layout | None = None, z: Zip | None = None) -> bytes:
    """``torch.save(root)`` as bytes, for a tree of dicts, ``Tensor``s and plain values."""
    return torch_zip(pickle_bytes(root), storages_of(root).values(), layout, z)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# --- real files, saved by torch ------------------------------------------------------------


def save_llama_bin(folder: Any, shards: int = 1) -> dict[str, Any]:
    """A tiny tied Llama as transformers' ``save_pretrained(safe_serialization=False)``
    wrote it: ``torch.save`` of the whole state dict (``lm_head.weight`` sharing the
    embedding's storage) as ``pytorch_model.bin``, or its shards with
    ``pytorch_model.bin.index.json``; config.json beside. Returns the state dict."""
    import json

    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import LLAMA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    model.config.save_pretrained(folder)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return state
    total = sum(t.numel() * t.element_size() for t in state.values())
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=total // shards + 1
    )
    for fname, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, folder / fname)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return state


def save_bert_bin(folder: Any) -> dict[str, Any]:
    """A tiny BERT as older transformers saved it: with the int64 ``position_ids``
    buffer in the state dict."""
    import torch
    from transformers import BertConfig, BertModel

    from models import BERT

    torch.manual_seed(0)
    model = BertModel(BertConfig(**BERT)).eval()
    model.config.save_pretrained(folder)
    state = dict(model.state_dict())
    state["embeddings.position_ids"] = torch.arange(BERT["max_position_embeddings"])[None]
    torch.save(state, folder / "pytorch_model.bin")
    return state


def nested_checkpoint(state: dict[str, Any], ddp: bool = False) -> dict[str, Any]:
    """A training script's ``.pth``: the state dict under ``state_dict`` (names with
    DDP's ``module.`` prefix if ``ddp``), the epoch, and the optimizer's state."""
    import torch

    params = [torch.nn.Parameter(t.float().clone()) for t in list(state.values())[:2]]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    named = {f"module.{k}" if ddp else k: v for k, v in state.items()}
    return {"state_dict": named, "epoch": 3, "optimizer": opt.state_dict()}


def odd_dtypes() -> dict[str, Any]:
    """fp8 and unsigned tensors (``_rebuild_tensor_v3``), a scalar, an empty tensor."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=g)
    return {
        "e4m3": x.to(torch.float8_e4m3fn),
        "e5m2": x.to(torch.float8_e5m2),
        "u16": torch.randint(0, 2**16, (4, 4), generator=g).to(torch.uint16),
        "u32": torch.randint(0, 2**31, (4, 4), generator=g).to(torch.uint32),
        "f32": x,
        "bf16": x.to(torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "mask": x > 0,
    }
