"""Reading torch.save files without running pickle: every tensor torch.save
writes comes back as the byte range torch itself loads, and hostile or
unsupported files are refused with one line naming the file."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fastcast import _core
from oracle import TORCH_NAMES

# safetensors name -> torch name, for every dtype a torch file can bring.
DTYPES = {
    **TORCH_NAMES,
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}


def tensors_of(result: _core.TorchFile) -> dict[str, _core.TorchTensor]:
    return {".".join(e["path"]): e["tensor"] for e in result["entries"] if "tensor" in e}


def others_of(result: _core.TorchFile) -> dict[str, str]:
    return {".".join(e["path"]): e["other"] for e in result["entries"] if "other" in e}


def from_range(torch: ModuleType, path: Path, t: _core.TorchTensor) -> Any:
    """The tensor rebuilt from its byte range, shape and strides alone."""
    begin, end = t["offsets"]
    dtype = getattr(torch, DTYPES[t["dtype"]])
    raw = bytearray(path.read_bytes()[begin:end])
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).as_strided(t["shape"], t["stride"], 0)


def raw_bytes(torch: ModuleType, tensor: Any) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def assert_matches_torch(torch: ModuleType, path: Path, loaded: dict[str, Any]) -> None:
    """Every tensor read equals what torch.load(weights_only=True) gives."""
    result = _core.read_torch_file(path)
    found = tensors_of(result)
    assert set(found) == set(loaded)
    data = path.read_bytes()
    for name, t in found.items():
        expected = loaded[name]
        assert DTYPES[t["dtype"]] == str(expected.dtype).removeprefix("torch."), name
        assert t["shape"] == list(expected.shape), name
        assert t["stride"] == list(expected.stride()), name
        assert t["storage_offset"] == expected.storage_offset(), name
        rebuilt = from_range(torch, path, t)
        assert raw_bytes(torch, rebuilt) == raw_bytes(torch, expected), name
        if t["contiguous"]:
            begin, end = t["offsets"]
            assert data[begin:end] == raw_bytes(torch, expected), name


def every_dtype(torch: ModuleType) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in DTYPES.values():
        dtype = getattr(torch, name)
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, (3, 5), generator=gen).bool()
        else:
            t = torch.randint(0, 100, (3, 5), generator=gen).to(dtype)
        out[name] = t
    return out


def test_every_dtype_reads_as_torch_loads_it(torch, tmp_path):
    path = tmp_path / "dtypes.bin"
    torch.save(every_dtype(torch), path)
    assert_matches_torch(torch, path, torch.load(path, weights_only=True))
    result = _core.read_torch_file(path)
    assert (result["format"], result["prefix"], result["byteorder"]) == ("zip", "dtypes", "little")
    assert result["unreferenced"] == []


def test_views_scalars_and_parameters(torch, tmp_path):
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    sd = {
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "base": base,
        "tied": base,
        "transposed": base.t(),
        "slice": base[2:4],
        "column": base[:, 3],
        "expanded": torch.ones(1, 3).expand(4, 3),
        "param": torch.nn.Parameter(torch.full((2, 2), 7.0)),
    }
    path = tmp_path / "views.pt"
    torch.save(sd, path)
    assert_matches_torch(torch, path, torch.load(path, weights_only=True))
    found = tensors_of(_core.read_torch_file(path))
    assert found["tied"] == found["base"]
    assert found["transposed"]["storage"] == found["base"]["storage"]
    assert not found["transposed"]["contiguous"]
    assert found["slice"]["contiguous"] and found["slice"]["storage_offset"] == 16
    assert found["expanded"]["stride"] == [0, 1] and not found["expanded"]["contiguous"]
    assert found["scalar"]["shape"] == [] and found["scalar"]["contiguous"]
    begin, end = found["empty"]["offsets"]
    assert begin == end


def test_a_nested_checkpoint_keeps_its_paths(torch, tmp_path):
    state = {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(2)}
    path = tmp_path / "ckpt.pth"
    torch.save(
        {
            "state_dict": state,
            "epoch": 3,
            "lr": 0.5,
            "name": "run",
            "args": argparse.Namespace(lr=0.1, layers=[1, 2]),
            "history": [1, 2, 3],
            "shape": (2, 3),
            "blob": b"xyz",
            "nothing": None,
            "flag": True,
        },
        path,
    )
    result = _core.read_torch_file(path)
    assert list(tensors_of(result)) == ["state_dict.layer.weight", "state_dict.layer.bias"]
    assert [e["path"] for e in result["entries"]][:2] == [
        ["state_dict", "layer.weight"],
        ["state_dict", "layer.bias"],
    ]
    assert others_of(result) == {
        "epoch": "int",
        "lr": "float",
        "name": "str",
        "args": "object argparse.Namespace",
        "history": "list of 3",
        "shape": "tuple of 2",
        "blob": "bytes",
        "nothing": "None",
        "flag": "bool",
    }
    # torch.load itself (weights_only=False: the test made this file) agrees.
    loaded = torch.load(path, weights_only=False)["state_dict"]
    assert_matches_torch(torch, path, {f"state_dict.{k}": v for k, v in loaded.items()})


def test_a_module_state_dict_and_protocol_4(torch, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for protocol in (2, 4):
        path = tmp_path / f"model-{protocol}.bin"
        torch.save(model.state_dict(), path, pickle_protocol=protocol)
        result = _core.read_torch_file(path)
        assert list(tensors_of(result)) == list(model.state_dict())
        # torch's weights_only loader refuses protocol 4 (FRAME); this test made the file.
        loaded = torch.load(path, weights_only=protocol == 2)
        assert_matches_torch(torch, path, dict(loaded))


def test_a_symlink_reads_its_target(torch, tmp_path):
    path = tmp_path / "real.bin"
    torch.save({"w": torch.ones(3)}, path)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    assert _core.read_torch_file(link)["entries"] == _core.read_torch_file(path)["entries"]


# ---- refused files ----


def refusal(path: Path) -> str:
    with pytest.raises(_core.InvalidCheckpointError) as info:
        _core.read_torch_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message


def rewrite(
    source: Path,
    target: Path,
    change: Callable[[str, bytes], tuple[str, bytes] | None],
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a torch zip member by member through Python's zipfile, each
    member passed through ``change`` (None drops it)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for info in src.infolist():
            changed = change(info.filename, src.read(info))
            if changed is not None:
                dst.writestr(changed[0], changed[1])
    return target


class Gadget:
    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, ("echo pwned",))


@pytest.fixture
def saved(torch, tmp_path) -> Path:
    path = tmp_path / "clean.bin"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, path)
    return path


def test_a_zipfile_rewrite_of_a_clean_file_reads(torch, saved, tmp_path):
    # Python's zipfile writes no ZIP64 records, descriptors or alignment.
    copy = rewrite(saved, tmp_path / "copy.bin", lambda name, data: (name, data))
    assert_matches_torch(torch, copy, torch.load(copy, weights_only=True))


def test_data_pkl_replaced_with_a_gadget(saved, tmp_path):
    evil = pickle.dumps({"w": Gadget()}, protocol=2)
    path = rewrite(
        saved,
        tmp_path / "evil.bin",
        lambda name, data: (name, evil if name.endswith("/data.pkl") else data),
    )
    assert refusal(path).endswith(
        f"pickle calls {os.system.__module__}.system, which fastcast never runs"
    )


def test_a_hidden_pickle_is_reported_not_read(saved):
    # zipfile appends the member where the central directory was and writes
    # a new one after it: still a tiled zip, with one member no tensor uses.
    with zipfile.ZipFile(saved, "a") as z:
        z.writestr("clean/data/9", pickle.dumps(Gadget(), protocol=2))
    assert _core.read_torch_file(saved)["unreferenced"] == ["clean/data/9"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda n, d: (n, d[:-4]) if n.endswith("/data/0") else (n, d),
            "zip member clean/data/0 holds 20 bytes, its storage declares 24",
        ),
        (
            lambda n, d: (n, b"big") if n.endswith("/byteorder") else (n, d),
            "big-endian",
        ),
        (
            lambda n, d: (n, b"99") if n.endswith("/version") else (n, d),
            "serialization version 99",
        ),
        (
            lambda n, d: ("clean/constants.pkl", d) if n.endswith("/.format_version") else (n, d),
            "TorchScript",
        ),
        (
            lambda n, d: ("other/" + n.split("/", 1)[1], d) if n.endswith("/version") else (n, d),
            "two folders",
        ),
        (lambda n, d: None if n.endswith("/data/0") else (n, d), "has no zip member clean/data/0"),
    ],
)
def test_corrupted_members_are_refused(saved, tmp_path, change, message):
    path = rewrite(saved, tmp_path / "bad.bin", change)
    assert message in refusal(path)


def test_compressed_members_are_refused(saved, tmp_path):
    path = rewrite(saved, tmp_path / "deflated.bin", lambda n, d: (n, d), zipfile.ZIP_DEFLATED)
    assert "is compressed (method 8)" in refusal(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_legacy_tar_and_torchscript_files_are_refused(torch, tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert refusal(legacy).endswith(
        "legacy (pre-1.6) torch format: re-save it with "
        "torch.save(torch.load(f, weights_only=True), f2)"
    )
    tar = tmp_path / "tar.bin"
    with tarfile.open(tar, "w") as t:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.size = 4
            t.addfile(info, io.BytesIO(b"\x80\x02N."))
    assert refusal(tar).endswith("a tar-format torch file (pre-1.6 torch); fastcast refuses it")
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    assert "TorchScript" in refusal(script)


def test_other_formats_and_missing_files(tmp_path):
    st = tmp_path / "model.safetensors.bin"
    st.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    assert "not a torch.save file (it looks like a safetensors file)" in refusal(st)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert "empty file" in refusal(empty)
    with pytest.raises(FileNotFoundError):
        _core.read_torch_file(tmp_path / "missing.bin")
    assert issubclass(_core.InvalidCheckpointError, _core.FastcastError)
