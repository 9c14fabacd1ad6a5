"""The output folder's rules at their edges: what counts as fastcast's own (a record
that lies is not evidence), one run at a time, variants that must be chosen, verify on
folders made elsewhere, and what an unfinished output looks like to inspect."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import fastcast
from commands import killed
from conftest import require
from folders import snapshot
from zoo import diffusers, llama, sentence_transformers


def test_a_record_naming_paths_outside_is_not_trusted(tmp_path):
    """``--overwrite`` deletes what fastcast.json lists; a record naming ``../x`` or
    ``/etc/x`` (edited, or planted) proves nothing, so nothing it names is replaced."""
    layout = llama(tmp_path)
    out = tmp_path / "out"
    fastcast.convert(layout.model, "bf16", output=out, progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "notes.txt").write_text("a user's file")
    record = json.loads((out / "fastcast.json").read_text())
    record["files"] += ["../victim.txt", "notes.txt"]
    (out / "fastcast.json").write_text(json.dumps(record))
    with pytest.raises(fastcast.OutputExistsError, match="fastcast did not write"):
        fastcast.convert(layout.model, "fp16", output=out, overwrite=True, progress=False)
    assert victim.read_text() == "keep me" and (out / "notes.txt").exists()


def test_overwrite_removes_the_previous_runs_stale_files_and_folders(tmp_path):
    """A previous conversion with more shards and a subfolder: every file it recorded
    and this run does not write is removed, and the folders it made if left empty."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    fastcast.convert(layout.model, "fp16", output=out, shard_size="1KB", progress=False)
    assert (out / "model.safetensors.index.json").exists()
    (layout.model / "2_Dense" / "model.safetensors").unlink()  # no more weights in 2_Dense/
    for stale in (layout.model / "2_Dense").iterdir():
        stale.unlink()
    (layout.model / "2_Dense").rmdir()
    fastcast.convert(layout.model, "bf16", output=out, overwrite=True, progress=False)
    assert not (out / "2_Dense").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*"))
    record = json.loads((out / "fastcast.json").read_text())
    assert sorted(record["files"]) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "fastcast.json"
    )


def test_one_run_at_a_time(tmp_path):
    """A second run into an output another run is writing (the output folder locked, as
    a run holds it from before its first write) is refused instead of writing into the
    same files."""
    fcntl = pytest.importorskip("fcntl")
    layout = llama(tmp_path)
    out = tmp_path / "out"
    killed("executed", "convert", layout.model, "-o", out, "--dtype", "fp16")
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(fastcast.OutputExistsError, match="another fastcast run"):
            fastcast.convert(layout.model, "fp16", output=out, resume=True, progress=False)
        staged = snapshot(out)
        with pytest.raises(fastcast.OutputExistsError, match="another fastcast run"):
            fastcast.convert(layout.model, "bf16", output=out, overwrite=True, progress=False)
        assert snapshot(out) == staged, "the running conversion's staging folder is left alone"
    finally:
        os.close(held)
    report = fastcast.convert(layout.model, "fp16", output=out, resume=True, progress=False)
    assert len(report.reused) == len(report.shards)


def test_a_folder_with_only_variants_asks_for_one(tmp_path):
    """No plain weights, only ``model.fp16.safetensors``: converting nothing silently
    would lose the weights, so fastcast asks for ``--variant``."""
    text_encoder = diffusers(tmp_path).model / "text_encoder"
    (text_encoder / "model.safetensors").unlink()
    with pytest.raises(
        fastcast.ModelFolderError, match=r"only variant weights .fp16.*--variant fp16"
    ):
        fastcast.convert(text_encoder, "bf16", output=tmp_path / "o", progress=False)
    report = fastcast.convert(
        text_encoder, "bf16", output=tmp_path / "o", variant="fp16", progress=False
    )
    assert report.shards == ["model.safetensors"]
    with pytest.raises(fastcast.ModelFolderError, match="no weights of variant 'int8'"):
        fastcast.convert(text_encoder.parent / "vae", "bf16", output=tmp_path / "p",
                         variant="int8")  # fmt: skip


def test_a_dotted_name_is_not_mistaken_for_a_variant(tmp_path, torch):
    """``sd_xl_base_1.0.safetensors`` is one file, not variant ``0`` of ``sd_xl_base_1``."""
    st = require("safetensors.torch")
    folder = tmp_path / "sdxl"
    folder.mkdir()
    st.save_file({"w": torch.ones(4)}, str(folder / "sd_xl_base_1.0.safetensors"))
    report = fastcast.convert(folder, "fp16", output=tmp_path / "o", progress=False)
    assert report.shards == ["sd_xl_base_1.0.safetensors"]


def test_verify_keep_for_a_folder_made_elsewhere(tmp_path):
    """Without a fastcast.json, verify is told what was kept with --keep."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    fastcast.convert(layout.model, "bf16", output=out, keep=["*norm*"], progress=False)
    (out / "fastcast.json").unlink()
    with pytest.raises(fastcast.ModelFolderError, match="pass --against"):
        fastcast.verify(out, device="cpu", progress=False)
    plain = fastcast.verify(out, layout.model, device="cpu", progress=False)
    assert not plain.ok and any("stored as F32, expected BF16" in p for p in plain.problems)
    told = fastcast.verify(out, layout.model, keep=["*norm*"], device="cpu", progress=False)
    assert told.ok, told.summary()


def test_inspect_names_an_unfinished_output_and_a_finished_ones_maker(tmp_path):
    layout = llama(tmp_path)
    out = tmp_path / "out"
    fastcast.convert(layout.model, "fp16", output=out, keep=["*norm*"], progress=False)
    info = fastcast.inspect(out)
    assert info.made_by is not None and "(F16, keep *norm*)" in info.made_by
    killed("executed", "convert", layout.model, "-o", tmp_path / "half", "--dtype", "bf16")
    before = snapshot(tmp_path / "half")
    with pytest.raises(fastcast.ModelFolderError, match=r"unfinished conversion.*--resume"):
        fastcast.inspect(tmp_path / "half")  # nothing in place: no weights to show
    assert snapshot(tmp_path / "half") == before


def test_resume_takes_reused_shards_loss_counts_from_the_journal(tmp_path):
    """The loss counts of a reused shard come from the journal the run wrote, not from
    reading its inputs again. Proof: after the kill, the input's hot value is replaced
    in place (same size, mtime put back, so the run still counts as the same); a
    re-read would find nothing to refuse, the journal still says it overflowed."""
    import os

    import numpy as np

    layout = llama(tmp_path)
    for folder in ("onnx", "original"):  # no subfolder, so old code reaches the check
        shutil.rmtree(layout.model / folder)
    out = tmp_path / "out"
    killed("executed", "convert", layout.model, "-o", out, "--dtype", "fp16")
    shard = next(
        p for p in sorted(layout.model.glob("model-*.safetensors"))
        if "model.layers.hot.weight" in {t[0] for t in fastcast.read_header(p)["tensors"]}
    )  # fmt: skip
    header = fastcast.read_header(shard)
    _, _, _, (begin, end) = next(t for t in header["tensors"] if t[0] == "model.layers.hot.weight")
    stat = shard.stat()
    raw = bytearray(shard.read_bytes())
    at = header["data_start"] + begin
    raw[at : at + end - begin] = np.zeros((end - begin) // 2, np.uint16).tobytes()
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(fastcast.LossError, match=r"model\.layers\.hot\.weight") as info:
        fastcast.convert(layout.model, "fp16", output=out, resume=True, strict=True,
                         progress=False)  # fmt: skip
    assert "reused" in str(info.value)
