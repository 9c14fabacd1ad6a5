"""``fastcast convert`` and ``inspect`` on hand-built folders: layout, naming,
config, copying, and every error a user can hit (each leaving nothing behind).

Real transformers models are in test_convert_models.py; these tests build
folders directly with safetensors so that each case is small and exact.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastcast
from conftest import require
from fastcast import _core
from fastcast._plan.shards import pack
from folders import load_all, save_folder, snapshot, tensors


@pytest.fixture(scope="module")
def st_torch():
    return require("safetensors.torch")


@pytest.fixture
def model(tmp_path, torch, st_torch):
    state = tensors(torch)
    return save_folder(st_torch, tmp_path / "model", state, shards=2), state


def test_convert_casts_floats_copies_the_rest_and_fixes_config(tmp_path, torch, st_torch, model):
    src, state = model
    before = snapshot(src)
    report = fastcast.convert(src, "bf16", output=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert snapshot(src) == before, "the input must not change"
    assert report.dtype == "BF16" and report.output == out
    assert report.tensors_cast == 7 and report.tensors_copied == 3
    loaded = load_all(st_torch, out)
    assert set(loaded) == set(state)
    for name, t in state.items():
        got = loaded[name]
        if t.is_floating_point():
            want = t.to(torch.bfloat16)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
        else:
            assert got.dtype == t.dtype and torch.equal(got, t), name
    config = json.loads((out / "config.json").read_text())
    # Both dtype keys wherever a config names its dtype, each beside its twin: newer
    # transformers read ``dtype``, older readers (vLLM, sglang...) ``torch_dtype``.
    assert list(config) == [
        "architectures",
        "hidden_size",
        "torch_dtype",
        "dtype",
        "text_config",
        "rope_scaling",
        "z_last",
    ]
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert config["text_config"] == {
        "model_type": "tiny_text",
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "vocab_size": 32,
    }
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0, "dtype": "int4"}
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "1_Pooling" / "config.json").exists()
    assert report.config["config.json"]["torch_dtype"] == ("float32", "bfloat16")
    assert report.config["config.json"]["dtype"] == ("(none)", "bfloat16")
    assert report.config["config.json"]["text_config.torch_dtype"] == ("(none)", "bfloat16")


def test_default_shard_size_gives_one_file_and_no_index(tmp_path, model):
    src, _ = model
    report = fastcast.convert(src, "fp16", output=tmp_path / "out", progress=False)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*"))
    assert files == ["model.safetensors"]
    assert report.shards == ["model.safetensors"] and report.indexes == []


def test_default_output_is_beside_the_input(tmp_path, model):
    src, _ = model
    report = fastcast.convert(src, "fp16", progress=False)
    assert report.output == tmp_path / "model-fp16"
    assert (tmp_path / "model-fp16" / "model.safetensors").exists()


def test_shards_follow_the_hub_splitter_and_the_index_agrees(tmp_path, torch, st_torch, model):
    src, _ = model
    limit = 9000  # a few tensors per shard; the 32x64 embedding (4 KiB in bf16) fits
    report = fastcast.convert(
        src, "bf16", output=tmp_path / "out", shard_size=limit, progress=False
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(report.shards)
    assert n > 2 and report.shards[0] == f"model-00001-of-{n:05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(report.shards)

    # Source order: input shards by name, each in data order (as fastcast plans it).
    order = []
    for f in sorted(src.glob("*.safetensors")):
        header = fastcast.read_header(f)
        order += [name for name, *_ in sorted(header["tensors"], key=lambda t: t[3])]
    loaded = load_all(st_torch, out)
    hub = require("huggingface_hub")
    split = hub.split_torch_state_dict_into_shards(
        {k: loaded[k] for k in order}, max_shard_size=limit
    )
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in loaded.values()
    )
    for fname in report.shards:
        header = fastcast.read_header(out / fname)
        assert {name for name, *_ in header["tensors"]} == {
            k for k, v in index["weight_map"].items() if v == fname
        }
        assert header["data_start"] % 8 == 0
        for _, dtype, _, (begin, _) in header["tensors"]:
            size = {"F32": 4, "BF16": 2, "I64": 8, "BOOL": 1, "U8": 1}[dtype]
            assert begin % size == 0, "every tensor aligned to its element size"


def test_one_tensor_per_shard(tmp_path, model):
    src, state = model
    report = fastcast.convert(src, "fp16", output=tmp_path / "out", shard_size=1, progress=False)
    assert len(report.shards) == len(state)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(state)


def test_packing_matches_the_hub_rules():
    class T:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    sizes = [3, 4, 12, 2, 2, 6, 1]
    groups = pack([T(s) for s in sizes], 6)  # type: ignore[misc]
    assert [[t.nbytes for t in g] for g in groups] == [[3], [12], [4, 2], [2], [6], [1]]
    assert [[t.nbytes for t in g] for g in pack([], 5)] == [[]]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 5 * 10**8),
        ("100", 100),
        ("1.5GB", 1_500_000_000),
        ("10 kb", 10_000),
        (4096, 4096),
    ],
)
def test_shard_sizes_parse_like_transformers(text, expected):
    assert fastcast.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5GiBs", "-1", "0", "GB", "1e9", ""])
def test_bad_shard_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="size"):
        fastcast.parse_size(bad)


def test_single_file_input_and_other_prefixes(tmp_path, torch, st_torch):
    state = tensors(torch, n_layers=1)
    lone = tmp_path / "adapter_model.safetensors"
    st_torch.save_file(state, str(lone))
    report = fastcast.convert(lone, "bf16", progress=False)
    assert report.output == tmp_path / "adapter_model-bf16"
    assert report.shards == ["adapter_model.safetensors"]
    assert (report.output / "adapter_model.safetensors").exists()

    diffusers = save_folder(
        st_torch, tmp_path / "unet", state, shards=2, prefix="diffusion_pytorch_model"
    )
    report = fastcast.convert(
        diffusers, "fp16", output=tmp_path / "unet16", shard_size=5000, progress=False
    )
    assert report.indexes == ["diffusion_pytorch_model.safetensors.index.json"]
    assert all(s.startswith("diffusion_pytorch_model-") for s in report.shards)


def test_fp8_output_saturates_like_torch(tmp_path, torch, st_torch):
    state = {"w": torch.tensor([1.0, 500.0, -1e6, float("inf"), 0.001])}
    st_torch.save_file(state, str(tmp_path / "m.safetensors"))
    fastcast.convert(tmp_path / "m.safetensors", "fp8_e4m3", output=tmp_path / "o", progress=False)
    got = st_torch.load_file(str(tmp_path / "o" / "m.safetensors"))["w"]
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), state["w"].to(torch.float8_e4m3fn).view(torch.uint8))


def test_stale_weights_and_vcs_folders_are_not_copied(tmp_path, model):
    src, _ = model
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    report = fastcast.convert(src, "bf16", output=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert not (out / "pytorch_model.bin").exists() and not (out / ".git").exists()
    assert "pytorch_model.bin" in report.skipped
    assert "pytorch_model.bin (torch .bin weights; the safetensors beside them" in report.summary()


def test_overwrite_replaces_only_a_previous_conversion(tmp_path, model):
    src, _ = model
    out = tmp_path / "out"
    fastcast.convert(src, "fp16", output=out, shard_size="9KB", progress=False)
    assert (out / "model.safetensors.index.json").exists()
    with pytest.raises(fastcast.OutputExistsError, match=r"not empty.*--overwrite"):
        fastcast.convert(src, "bf16", output=out, progress=False)
    fastcast.convert(src, "bf16", output=out, overwrite=True, progress=False)
    # the previous run's shards and index were fastcast's: replaced, none left over
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    (out / "old.txt").write_text("a user's notes")
    before = snapshot(out)
    with pytest.raises(fastcast.OutputExistsError, match=r"fastcast did not write \(old.txt\)"):
        fastcast.convert(src, "fp16", output=out, overwrite=True, progress=False)
    assert snapshot(out) == before


def test_inspect_reports_dtypes_and_the_config_trap(tmp_path, torch, st_torch):
    state = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tensors(torch).items()
    }
    folder = save_folder(st_torch, tmp_path / "m", state)  # config claims float32
    info = fastcast.inspect(folder)
    assert info.tensors == len(state)
    assert info.dtypes[0].dtype == "BF16"
    assert info.config_dtypes == {"torch_dtype": "float32", "text_config.dtype": "float32"}
    assert any(
        "says torch_dtype=float32 but the float weights are stored as BF16" in w
        for w in info.warnings
    )
    r = subprocess.run(
        [sys.executable, "-m", "fastcast.cli", "inspect", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "BF16" in r.stdout and "warning: config.json says" in r.stdout


# --- errors: a clear message, nothing written, input untouched -------------------------


def expect_failure(src: Path, out: Path, error: type[Exception], message: str, **kw) -> None:
    before = snapshot(src) if src.is_dir() else None
    with pytest.raises(error, match=message):
        fastcast.convert(src, kw.pop("dtype", "bf16"), output=out, progress=False, **kw)
    assert not out.exists() or not any(out.iterdir()), "nothing may be left in the output"
    if before is not None:
        assert snapshot(src) == before


def test_missing_folder(tmp_path):
    expect_failure(
        tmp_path / "nope",
        tmp_path / "out",
        fastcast.ModelFolderError,
        "nope: no such file or folder",
    )


def test_folder_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "flax_model.msgpack").write_bytes(b"x")
    expect_failure(
        tmp_path / "m",
        tmp_path / "out",
        fastcast.ModelFolderError,
        "no .safetensors or .bin weights found",
    )


def test_a_bin_that_is_not_a_torch_file_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    expect_failure(
        tmp_path / "m",
        tmp_path / "out",
        fastcast.InvalidCheckpointError,
        "pytorch_model.bin: not a torch.save file",
    )


def test_index_naming_an_absent_shard(tmp_path, model):
    src, _ = model
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    expect_failure(
        src,
        tmp_path / "out",
        fastcast.ModelFolderError,
        "names shard 'model-00009-of-00009.safetensors', which does not exist",
    )


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"metadata": {}}',
        '{"weight_map": ["model.step"]}',
        '{"weight_map": {"model.step": 3}}',
        '{"weight_map": {"model.step": null}}',
    ],
)
def test_index_without_a_weight_map_of_names_to_files(tmp_path, model, text):
    src, _ = model
    index = src / "model.safetensors.index.json"
    index.write_text(text)
    expect_failure(
        src, tmp_path / "out", fastcast.ModelFolderError, "has no weight_map of tensor names"
    )


def test_index_key_listed_twice_takes_the_last_file_as_json_load_does(tmp_path, model):
    """A weight map naming a tensor twice means its last file (what transformers'
    json.load reads), wherever the first listing was."""
    src, _ = model
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    (name, file), *_ = data["weight_map"].items()
    other = next(f for f in data["weight_map"].values() if f != file)
    text = json.dumps(data["weight_map"])
    twice = text[:-1] + f", {json.dumps(name)}: {json.dumps(other)}}}"
    assert json.loads(twice)[name] == other
    index.write_text('{"weight_map": ' + twice + "}")
    expect_failure(src, tmp_path / "out", fastcast.ModelFolderError, f"says '{name}' is in {other}")


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "a/../../x"])
def test_index_paths_escaping_the_folder(tmp_path, model, target):
    src, _ = model
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.step"] = target
    index.write_text(json.dumps(data))
    expect_failure(src, tmp_path / "out", fastcast.ModelFolderError, "outside the model folder")


def test_shard_symlink_leaving_the_folder(tmp_path, model):
    src, _ = model
    elsewhere = tmp_path / "elsewhere.safetensors"
    shard = src / "model-00002-of-00002.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    expect_failure(src, tmp_path / "out", fastcast.ModelFolderError, "links outside the model")


def test_tensor_listed_twice(tmp_path, torch, st_torch):
    src = save_folder(st_torch, tmp_path / "m", tensors(torch), shards=2)
    dup = {"model.step": torch.tensor([1], dtype=torch.int64)}
    other = "model-00001-of-00002.safetensors"
    first = st_torch.load_file(str(src / other))
    first.update(dup)
    st_torch.save_file(first, str(src / other))
    expect_failure(src, tmp_path / "out", fastcast.ModelFolderError, "'model.step' is also in")


def test_truncated_shard(tmp_path, model):
    src, _ = model
    shard = src / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_failure(
        src,
        tmp_path / "out",
        fastcast.InvalidSafetensorsError,
        "model-00001-of-00002.safetensors: .*past the end of the data",
    )


def test_unknown_and_uncastable_target_dtypes(tmp_path, model):
    src, _ = model
    expect_failure(src, tmp_path / "out", fastcast.DtypeError, "unknown dtype .bf15", dtype="bf15")
    expect_failure(
        src, tmp_path / "out", fastcast.DtypeError, "target must be one of", dtype="int8"
    )


def test_output_inside_or_equal_to_the_input(tmp_path, model):
    src, _ = model
    expect_failure(src, src / "sub", fastcast.OutputExistsError, "inside the input folder")
    with pytest.raises(fastcast.OutputExistsError, match="inside the input folder"):
        fastcast.convert(src, "bf16", output=src, progress=False)
    with pytest.raises(fastcast.OutputExistsError, match="holds the input"):
        fastcast.convert(src, "bf16", output=tmp_path, overwrite=True, progress=False)
    assert (src / "model-00001-of-00002.safetensors").exists()


def test_not_enough_space(tmp_path, model, monkeypatch):
    src, _ = model
    real = shutil.disk_usage

    def tiny_disk(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    expect_failure(
        src,
        tmp_path / "out",
        fastcast.InsufficientSpaceError,
        r"not enough disk space: the output needs .* MB, 1.0 kB is free",
    )


def test_interrupt_inside_the_executor_removes_the_partial_shard(tmp_path, model):
    src, _ = model
    from fastcast._plan.shards import plan_conversion
    from fastcast._source.folder import open_model

    plan = plan_conversion(open_model(src), "BF16", 10**9)
    out = tmp_path / "out"
    out.mkdir()
    sizes = {p: p.stat().st_size for p in plan.sources}

    def interrupt(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _core.execute_plan(plan.to_dict(out, sizes), progress=interrupt)
    assert list(out.iterdir()) == []


def test_ctrl_c_on_the_cli_stops_cleanly(tmp_path):
    src = tmp_path / "big"
    here = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            str(here / "benches" / "make_model.py"),
            str(src),
            "--size",
            "400MB",
            "--shard-size",
            "100MB",
        ],
        check=True,
        capture_output=True,
    )
    out = tmp_path / "out"
    # SIGINT once the shard is being written, from a thread of the process itself
    # (tests/kill_at.py), so that it comes in time on a busy machine.
    r = subprocess.run(
        [sys.executable, str(here / "tests" / "kill_at.py"), "writing@INT", "--",
         "convert", str(src), "-o", str(out), "--dtype", "fp16", "--threads", "1",
         "--max-memory", "256KiB"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    stopped = time.monotonic()
    if r.returncode in (0, 3):
        pytest.fail(f"the conversion finished before it could be interrupted: {r.stderr}")
    sent = float(r.stderr.split("kill_at: sent SIGINT at ")[1].split()[0])
    assert stopped - sent < 1.5, "Ctrl-C must stop the run within about a second"
    err = r.stderr
    assert r.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert not list(out.rglob("*.fastcast-partial")), "the partial shard must be removed"
    assert not list(out.glob("*.safetensors")), "nothing is put in place"
    for shard in out.rglob("*.safetensors"):  # shards finished before it are whole
        fastcast.read_header(shard)


# --- the CLI ------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcast.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "100"},
    )


def test_cli_convert_prints_a_summary(tmp_path, model):
    src, _ = model
    r = cli(
        "convert",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--dtype",
        "fp16",
        "--shard-size",
        "8KB",
        "--threads",
        "2",
        "--no-fsync",
    )
    assert r.returncode == 0, r.stderr
    assert "7 cast, 3 copied" in r.stdout and "model.safetensors.index.json" in r.stdout
    assert "config.json: torch_dtype: float32 -> float16" in r.stdout
    q = cli("convert", str(src), "-o", str(tmp_path / "q"), "--dtype", "fp16", "--quiet")
    assert q.returncode == 0 and q.stdout == "" and q.stderr == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "{missing}", "--dtype", "bf16"], "no such file or folder"),
        (["convert", "{src}", "--dtype", "bf17"], "unknown dtype"),
        (["convert", "{src}", "--dtype", "bf16", "--shard-size", "lots"], "not a size"),
        (["convert", "{src}", "-o", "{src}", "--dtype", "bf16"], "inside the input folder"),
        (["convert", "{src}", "--dtype", "bf16", "--max-memory", "1KB"], "too small"),
        (["inspect", "{missing}"], "no such file or folder"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, model, args, message):
    src, _ = model
    argv = [a.format(src=src, missing=tmp_path / "missing") for a in args]
    r = cli(*argv)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcast: error: "), r.stderr
    assert message in lines[0]
    r = cli("--debug", *argv)
    assert "Traceback" in r.stderr


def test_cli_help_describes_convert():
    r = cli("convert", "--help")
    assert r.returncode == 0
    for flag in (
        "--dtype",
        "--shard-size",
        "--output",
        "--threads",
        "--overwrite",
        "--no-fsync",
        "--max-memory",
        "--quiet",
        "--fp8-overflow",
    ):
        assert flag in r.stdout


def test_header_writer_pads_to_eight(tmp_path, model):
    src, _ = model
    fastcast.convert(src, "bf16", output=tmp_path / "o", progress=False)
    raw = (tmp_path / "o" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"
    assert np.frombuffer(raw[8 : 8 + n], np.uint8)[-1] in (ord(" "), ord("}"))
