"""The nine findings of the outside review, one test each, on the layouts that broke.

Each test failed on the code the review looked at (main at 6a0055b) and says what it
saw there; the zoo-wide versions of these checks are in test_zoo.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import fastcast
from commands import cli, killed, refused
from conftest import require
from folders import snapshot
from zoo import HOT, diffusers, hf_link, hf_snapshot, llama, project, sentence_transformers

# 1 ----------------------------------------------------------------------------------


def test_1_resume_with_a_subfolder_after_sigkill(tmp_path):
    """Was: ``[Errno 39] Directory not empty`` renaming ``.1_Pooling.fastcast-partial``."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    killed("executed", "convert", layout.model, "-o", out, "--dtype", "bf16")
    r = cli("convert", layout.model, "-o", out, "--dtype", "bf16", "--resume")
    assert r.returncode == 0, r.stderr
    cli("convert", layout.model, "-o", tmp_path / "fresh", "--dtype", "bf16")
    assert snapshot(out) == snapshot(tmp_path / "fresh")


def test_1_resume_after_a_kill_inside_a_folder_copy(tmp_path):
    """Was: the kill left a partial *directory* and every resume died with
    ``[Errno 21] Is a directory``."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    killed("copy:2", "convert", layout.model, "-o", out, "--dtype", "bf16")
    for _ in range(2):  # a resume that fails must not make the next one fail too
        r = cli("convert", layout.model, "-o", out, "--dtype", "bf16", "--resume")
    assert r.returncode == 0, r.stderr
    cli("convert", layout.model, "-o", tmp_path / "fresh", "--dtype", "bf16")
    assert snapshot(out) == snapshot(tmp_path / "fresh")


# 2 ----------------------------------------------------------------------------------


def test_2_resume_strict_refuses_a_reused_shard_that_overflowed(tmp_path):
    """Was: ``--resume --strict`` finished and wrote an index although a reused shard
    overflowed (its loss counts were never looked at)."""
    layout = llama(tmp_path)
    for folder in ("onnx", "original"):  # finding 1 aside: no subfolder to trip over
        shutil.rmtree(layout.model / folder)
    out = tmp_path / "out"
    killed("executed", "convert", layout.model, "-o", out, "--dtype", "fp16")
    before = snapshot(out)
    r = cli("convert", layout.model, "-o", out, "--dtype", "fp16", "--resume", "--strict")
    refused(r, "refusing", "model.layers.hot.weight")
    assert not (out / "model.safetensors.index.json").exists()
    assert snapshot(out) == before, "a refusal leaves the interrupted run as it was"


# 3 ----------------------------------------------------------------------------------


def test_3_strict_refusal_leaves_no_output(tmp_path):
    """Was: tokenizer.json, 1_Pooling/ and .fastcast-run.json stayed behind, and the next
    run said an interrupted run had left them."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    r = cli("convert", layout.model, "-o", out, "--dtype", "fp16", "--strict")
    refused(r, "refusing")
    assert not out.exists()
    r = cli("convert", layout.model, "-o", out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr


def test_3_strict_refusal_with_overwrite_keeps_the_previous_output(tmp_path):
    """Was: ``--overwrite`` deleted the user's previous good output before refusing."""
    layout = sentence_transformers(tmp_path)
    out = tmp_path / "out"
    assert cli("convert", layout.model, "-o", out, "--dtype", "bf16").returncode == 0
    before = snapshot(out)
    r = cli("convert", layout.model, "-o", out, "--dtype", "fp16", "--strict", "--overwrite")
    refused(r, "refusing")
    assert snapshot(out) == before


# 4 ----------------------------------------------------------------------------------


def test_4_overwrite_never_deletes_what_fastcast_did_not_write(tmp_path):
    """Was: ``--overwrite`` deleted everything in the target, ``.git/`` and ``src/``."""
    layout = llama(tmp_path)
    target = project(tmp_path)
    before = snapshot(target.model)
    r = cli("convert", layout.model, "-o", target.model, "--dtype", "fp16", "--overwrite")
    refused(r, ".git", "src", "notes.md")
    assert snapshot(target.model) == before


# 5 ----------------------------------------------------------------------------------


def test_5_convert_keep_verify_passes(tmp_path):
    """Was: exit 1 every time (verify did not know which tensors were kept)."""
    layout = sentence_transformers(tmp_path)
    r = cli(
        "convert",
        layout.model,
        "-o",
        tmp_path / "out",
        "--dtype",
        "bf16",
        "--keep",
        "*norm*",
        "--verify",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


# 6 ----------------------------------------------------------------------------------


def test_6_weights_in_other_formats_are_never_copied(tmp_path, torch):
    """Was: ``adapter_model.bin``, ``diffusion_pytorch_model.bin``, ``onnx/``,
    ``original/consolidated.00.pth`` and ``rust_model.ot`` were copied."""
    st = require("safetensors.torch")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    st.save_file(
        {"base_model.lora_A.weight": torch.randn(4, 8)}, str(adapter / "adapter_model.safetensors")
    )
    (adapter / "adapter_model.bin").write_bytes(b"PK\x03\x04 pickle")
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    checks = [(adapter, {"adapter_model.bin"})]
    for layout in (llama(tmp_path), sentence_transformers(tmp_path)):
        checks.append((layout.model, layout.skipped))
    unet = diffusers(tmp_path).model / "unet"
    checks.append((unet, {"diffusion_pytorch_model.bin"}))
    for i, (model, stale) in enumerate(checks):
        out = tmp_path / f"out{i}"
        r = cli("convert", model, "-o", out, "--dtype", "bf16")
        assert r.returncode == 0, r.stderr
        leaked = {rel for rel in stale if (out / rel).exists()}
        assert not leaked, f"{model.name}: copied {sorted(leaked)}"
        assert not (out / "original").exists() and not (out / "onnx").exists()


def test_6_a_variant_is_not_converted_under_its_variant_name(tmp_path):
    """Was: ``model.fp16.safetensors`` came out as bf16 data under its ``.fp16`` name."""
    text_encoder = diffusers(tmp_path).model / "text_encoder"
    out = tmp_path / "out"
    r = cli("convert", text_encoder, "-o", out, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert not (out / "model.fp16.safetensors").exists()
    assert "model.fp16.safetensors" in r.stderr + r.stdout, "the skipped variant is named"


def test_6_a_variant_index_is_not_copied(tmp_path):
    """Was: ``model.safetensors.index.fp16.json`` was copied, naming shards not there."""
    layout = llama(tmp_path)
    r = cli("convert", layout.model, "-o", tmp_path / "out", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.fp16.json").exists()


# 7 ----------------------------------------------------------------------------------


def cache_revisions(cache: Path) -> set[str]:
    hub = require("huggingface_hub")
    info = hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    return {rev.commit_hash for repo in info.repos for rev in repo.revisions}


@pytest.mark.parametrize("build", [hf_snapshot, hf_link])
def test_7_default_output_of_a_cache_snapshot_is_never_in_the_cache(tmp_path, build):
    """Was: the output landed in ``snapshots/``, where huggingface_hub lists it as a
    detached revision and a cache cleanup deletes it."""
    layout = build(tmp_path)
    assert layout.cache is not None and layout.default_stem is not None
    work = tmp_path / "work"
    work.mkdir()
    revisions = cache_revisions(layout.cache)
    cached = snapshot(layout.cache)
    r = cli("convert", layout.model, "--dtype", "fp16", cwd=work)
    assert r.returncode == 0, r.stderr
    assert snapshot(layout.cache) == cached and cache_revisions(layout.cache) == revisions
    expected = work / layout.default_stem.parent / f"{layout.default_stem.name}-fp16"
    assert (expected / "model.safetensors").exists() and (expected / "config.json").exists()


# 8 ----------------------------------------------------------------------------------


def test_8_a_symlinked_single_file_converts(tmp_path, torch):
    """Was: refused as "links outside the model folder"."""
    st = require("safetensors.torch")
    real = tmp_path / "store" / "blob.safetensors"
    real.parent.mkdir()
    st.save_file({"w": torch.tensor([1.0, HOT])}, str(real))
    link = tmp_path / "links" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(real, link.parent))
    report = fastcast.convert(link, "bf16", progress=False)
    assert report.output == tmp_path / "links" / "model-bf16"
    got = st.load_file(str(report.output / "model.safetensors"))["w"]
    assert torch.equal(got, torch.tensor([1.0, HOT]).to(torch.bfloat16))


# 9 ----------------------------------------------------------------------------------


def test_9_no_torch_dtype_is_added_to_a_diffusers_config(tmp_path):
    """Was: a top-level ``torch_dtype`` was added to every config.json, diffusers' too."""
    unet = diffusers(tmp_path).model / "unet"
    r = cli("convert", unet, "-o", tmp_path / "out", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").read_bytes() == (unet / "config.json").read_bytes()
    text_encoder = diffusers(tmp_path / "again").model / "text_encoder"
    r = cli("convert", text_encoder, "-o", tmp_path / "te", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert config["torch_dtype"] == "float16", "a transformers config still gets the new dtype"


def test_the_zoo_builds_as_promised(tmp_path):
    """The fixtures themselves: files the layouts say exist, do."""
    for layout in (sentence_transformers(tmp_path), llama(tmp_path)):
        for rel in layout.copied | layout.skipped:
            assert (layout.root / rel).exists(), rel
    assert os.path.islink(hf_snapshot(tmp_path / "c").model / "config.json")
