"""Every user-facing command against every layout of the zoo (see zoo.py), as a user
runs it: the ``fastcast`` command in a subprocess, then the result read back with
safetensors and torch.

Commands: ``convert`` plain (and its default output), ``--resume`` after a real
SIGKILL at several points, ``--strict`` refusing (new output and ``--overwrite`` of a
previous one), ``--overwrite``, ``--keep ... --verify``, ``inspect``, ``verify``. The
project folder is an output target every convert command must leave alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import fastcast
from commands import cli, killed, ok, refused
from conftest import require
from folders import snapshot
from zoo import TARGETS, ZOO, Layout, llama

RECORD = "fastcast.json"


def convert_args(layout: Layout, out: Path | None, dtype: str, *extra: object) -> list[object]:
    args: list[object] = ["convert", layout.model, "--dtype", dtype]
    if out is not None:
        args += ["-o", out]
    if layout.variant:
        args += ["--variant", layout.variant]
    return [*args, *extra]


@pytest.fixture(params=sorted(ZOO))
def layout(request, tmp_path) -> Layout:
    return ZOO[request.param](tmp_path)


@pytest.fixture(scope="module")
def st():
    return require("safetensors.torch")


# --- what a correct output holds --------------------------------------------------------

SHARD_OF = re.compile(r"^(?P<prefix>.+?)(-\d{5}-of-\d{5})?\.safetensors$")


def check_output(layout: Layout, out: Path, dtype: str, keep: tuple[str, ...] = ()) -> None:
    """The output holds exactly what the layout promises: each weight set's tensors
    as torch casts them (kept ones and non-floats untouched), an index where there are
    several shards, the copies byte for byte, the configs right, the record, and
    nothing else (no stale format, no variant, no staging folder, no partial file)."""
    import fnmatch

    torch, st = require("torch"), require("safetensors.torch")
    target = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype])
    files = snapshot(out)
    expected = {RECORD}
    for key, state in layout.weights.items():
        folder, _, prefix = key.rpartition("/")
        names = sorted(
            rel
            for rel in files
            if rel.rpartition("/")[0] == folder
            and (m := SHARD_OF.match(rel.rpartition("/")[2]))
            and m["prefix"] == prefix
        )
        assert names, f"no shards for {key} in {sorted(files)}"
        expected.update(names)
        loaded = {}
        for rel in names:
            loaded.update(st.load_file(str(out / rel)))
        assert set(loaded) == set(state), key
        for name, t in state.items():
            kept = any(fnmatch.fnmatchcase(name, p) for p in keep)
            want = t.to(target) if t.is_floating_point() and not kept else t
            assert loaded[name].dtype == want.dtype, (key, name)
            assert torch.equal(loaded[name].view(torch.uint8), want.view(torch.uint8)), name
        index = f"{key}.safetensors.index.json"
        if len(names) > 1:
            weight_map = json.loads(files[index])["weight_map"]
            assert {n: f"{folder}/{f}".lstrip("/") for n, f in weight_map.items()} == {
                n: rel for rel in names for n in st.load_file(str(out / rel))
            }
            expected.add(index)
    for rel in layout.copied | layout.other_configs:
        assert files.get(rel) == (layout.root / rel).read_bytes(), f"{rel} not copied as is"
        expected.add(rel)
    for rel in layout.model_configs:
        config = json.loads(files[rel])
        claims = [v for k, v in config.items() if k in ("torch_dtype", "dtype")]
        assert claims and all(v == str(target).removeprefix("torch.") for v in claims), rel
        expected.add(rel)
    for rel in layout.skipped:
        assert rel not in files, f"{rel} must not be copied"
    assert set(files) == expected, f"unexpected: {sorted(set(files) - expected)}"
    record = json.loads(files[RECORD])
    assert record["dtype"] == dtype and record["keep"] == list(keep)
    assert record["variant"] == layout.variant


# --- the commands ---------------------------------------------------------------------


def test_convert(layout, tmp_path):
    before = snapshot(layout.root)
    out = tmp_path / "out"
    ok(cli(*convert_args(layout, out, "bf16")))
    check_output(layout, out, "BF16")
    assert snapshot(layout.root) == before, "the input never changes"


def test_default_output(layout, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    ok(cli(*convert_args(layout, None, "fp16"), cwd=work))
    stem = layout.default_stem
    if stem is None:
        expected = Path(os.path.abspath(layout.model)).parent / f"{layout.model.name}-fp16"
    else:
        expected = (work / stem).parent / f"{stem.name}-fp16"
    check_output(layout, expected, "F16")


#: Mid-copy; every shard written; before the staging folder exists (the first rename);
#: just before the commit's first rename; mid-commit, one file in place.
KILL_POINTS = ["copy:2", "executed", "replace:1", "replace:3", "replace:4"]


#: Layouts with fewer than two files to copy: no "copy:2" point to kill at.
COPYLESS = {"symlinked-file", "checkpoint-pth"}


@pytest.mark.parametrize(
    ("name", "point"),
    [(n, p) for n in sorted(ZOO) for p in KILL_POINTS if not (n in COPYLESS and "copy" in p)],
)
def test_resume_after_sigkill(tmp_path, name, point):
    """A real SIGKILL at each step (mid-copy, after the shards, mid-commit); then
    ``--resume`` ends byte-identical to a fresh run, and a second ``--resume`` says
    there is nothing to do."""
    layout = ZOO[name](tmp_path)
    assert (len(layout.copied | layout.other_configs) < 2) == (name in COPYLESS)
    out = tmp_path / "out"
    killed(point, *convert_args(layout, out, "bf16", "--shard-size", "2KB"))
    if (out / ".fastcast-staging").exists():
        refused(cli(*convert_args(layout, out, "bf16", "--shard-size", "2KB")), "--resume")
    ok(cli(*convert_args(layout, out, "bf16", "--shard-size", "2KB", "--resume")))
    ok(cli(*convert_args(layout, tmp_path / "fresh", "bf16", "--shard-size", "2KB")))
    assert snapshot(out) == snapshot(tmp_path / "fresh")
    check_output(layout, out, "BF16")
    again = ok(cli(*convert_args(layout, out, "bf16", "--shard-size", "2KB", "--resume")))
    assert "already converted" in again and "nothing to do" in again


def test_strict_refusal_leaves_everything_as_it_was(layout, tmp_path):
    out = tmp_path / "out"
    hot = layout.strict_dtype
    refused(cli(*convert_args(layout, out, hot, "--strict")), "refusing", "overflowed")
    assert not out.exists(), "a refused run leaves no output folder"
    ok(cli(*convert_args(layout, out, "bf16")))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    refused(cli(*convert_args(layout, out, hot, "--strict", "--overwrite")), "refusing")
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before, "the previous output is untouched"


def test_overwrite_replaces_a_previous_conversion(layout, tmp_path):
    out = tmp_path / "out"
    ok(cli(*convert_args(layout, out, "fp16", "--shard-size", "1KB")))
    refused(cli(*convert_args(layout, out, "bf16")), "--overwrite")
    ok(cli(*convert_args(layout, out, "bf16", "--overwrite")))
    check_output(layout, out, "BF16")  # the old shards and indexes are gone


def test_keep_and_verify(layout, tmp_path):
    out = tmp_path / "out"
    stdout = ok(cli(*convert_args(layout, out, "bf16", "--keep", "*norm*", "--verify")))
    assert "OK" in stdout
    check_output(layout, out, "BF16", keep=("*norm*",))


def test_inspect(layout):
    stdout = ok(
        cli("inspect", layout.model, *(["--variant", layout.variant] if layout.variant else []))
    )
    for key in layout.weights:
        assert f"{key}:" in stdout or f"{key.rpartition('/')[2]}:" in stdout, key
    info = fastcast.inspect(layout.model, variant=layout.variant)
    assert {ws.prefix for ws in info.weight_sets} == set(layout.weights)


def test_verify(layout, tmp_path, st):
    out = tmp_path / "out"
    ok(cli(*convert_args(layout, out, "fp16")))
    assert "OK" in ok(cli("verify", out))
    assert "OK" in ok(cli("verify", out, "--against", layout.model))
    # one flipped bit in the largest shard is found and named
    shard = max((p for p in out.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    header = fastcast.read_header(shard)
    name, _, _, (begin, _) = next(t for t in header["tensors"] if t[1] == "F16")
    raw = bytearray(shard.read_bytes())
    raw[header["data_start"] + begin + 1] ^= 0x01
    shard.write_bytes(bytes(raw))
    r = cli("verify", out)
    assert r.returncode == 1 and f"mismatch: {name}" in r.stdout, r.stdout + r.stderr


# --- the project folder: an output target nothing may touch -----------------------------


@pytest.mark.parametrize(
    "extra",
    [(), ("--overwrite",), ("--strict",), ("--resume",), ("--overwrite", "--strict")],
    ids=["plain", "overwrite", "strict", "resume", "overwrite-strict"],
)
def test_a_project_folder_is_never_touched(tmp_path, extra):
    target = TARGETS["project"](tmp_path)
    model = llama(tmp_path)
    before = snapshot(target.model)
    r = cli("convert", model.model, "-o", target.model, "--dtype", "fp16", *extra)
    line = refused(r)
    if "--overwrite" in extra:
        assert ".git/" in line and "src/" in line and "notes.md" in line
    assert snapshot(target.model) == before
    refused(cli("inspect", target.model), "no .safetensors or .bin weights")
    refused(cli("verify", target.model), "pass --against")
    assert snapshot(target.model) == before


def test_a_batch_of_the_whole_zoo_matches_each_model_converted_alone(tmp_path):
    """``convert --jobs`` over every layout at once (each with its own output and
    variant): each output is a correct conversion, and byte for byte the one that
    converting that model alone writes."""
    layouts = [build(tmp_path / "zoo" / name) for name, build in sorted(ZOO.items())]
    lines = ['dtype = "bf16"', 'shard_size = "5GB"']
    for layout in layouts:
        lines += ["[[model]]", f"path = {json.dumps(str(layout.model))}"]
        lines.append(f"output = {json.dumps(str(tmp_path / 'batch' / layout.name))}")
        if layout.variant:
            lines.append(f"variant = {json.dumps(layout.variant)}")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text("\n".join(lines) + "\n")
    before = {layout.name: snapshot(layout.root) for layout in layouts}
    ok(cli("convert", "--jobs", jobs, "--quiet"))
    for layout in layouts:
        alone = tmp_path / "alone" / layout.name
        ok(cli(*convert_args(layout, alone, "bf16", "--quiet")))
        check_output(layout, tmp_path / "batch" / layout.name, "BF16")
        assert snapshot(tmp_path / "batch" / layout.name) == snapshot(alone), layout.name
        assert snapshot(layout.root) == before[layout.name], "the input never changes"
