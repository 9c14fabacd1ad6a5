"""``fastcast convert org/name[@revision]``: the model from the local Hugging Face
cache, as huggingface_hub lays it out, offline; the output in the working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from commands import ok
from folders import snapshot
from zoo import _hf_cache, llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fastcast_in(cwd, env, *args):
    """The command run from ``cwd``, with ``env`` added and no network to reach."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **{k: str(v) for k, v in env.items()}}
    for unset in ("HF_HUB_CACHE", "HF_HOME"):
        if unset not in env:
            full.pop(unset, None)
    return subprocess.run(
        [sys.executable, "-m", "fastcast.cli", *map(str, args)],
        capture_output=True, text=True, check=False, cwd=cwd, env=full,
    )  # fmt: skip


def test_a_repo_id_converts_the_cached_snapshot_into_the_working_directory(tmp_path):
    cache, snapshot_dir, _, _ = _hf_cache(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    ok(fastcast_in(work, {"HF_HUB_CACHE": cache}, "convert", "acme/tiny-llama", "-d", "bf16"))
    got = snapshot(work / "tiny-llama-bf16")
    ok(
        fastcast_in(
            work, {}, "convert", snapshot_dir, "-o", tmp_path / "direct", "-d", "bf16", "-q"
        )
    )
    direct = snapshot(tmp_path / "direct")
    # The same bytes, but the record of a repo id's conversion names the repo and the
    # commit converted (the snapshot path alone does not say which repo it was).
    record = json.loads(got.pop("fastcast.json"))
    direct_record = json.loads(direct.pop("fastcast.json"))
    assert got == direct
    assert (record["repo_id"], record["revision"]) == ("acme/tiny-llama", snapshot_dir.name)
    assert (direct_record["repo_id"], direct_record["revision"]) == (None, None)
    assert record["source"] == direct_record["source"] == str(snapshot_dir)
    assert not list(cache.rglob("*-bf16")), "nothing is written inside the cache"


def test_hf_home_and_revisions(tmp_path):
    cache, _, _, _ = _hf_cache(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    home = {"HF_HOME": cache.parent}  # HF_HOME/hub is the cache
    for i, ref in enumerate(("acme/tiny-llama@main", f"acme/tiny-llama@{COMMIT}")):
        ok(fastcast_in(work, home, "convert", ref, "-d", "fp16", "-o", f"o{i}", "-q"))
        record = json.loads((work / f"o{i}" / "fastcast.json").read_text())
        assert record["source"].endswith(f"snapshots/{COMMIT}")


def test_a_repo_not_in_the_cache_is_one_line(tmp_path):
    cache, _, _, _ = _hf_cache(tmp_path)
    for ref in ("acme/absent", "acme/tiny-llama@no-such-branch"):
        r = fastcast_in(tmp_path, {"HF_HUB_CACHE": cache}, "convert", ref, "-d", "bf16")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        (line,) = r.stderr.splitlines()
        assert (
            line.startswith(f"fastcast: error: {ref}: ") and "not in the Hugging Face cache" in line
        )
    assert not list(tmp_path.glob("*-bf16"))


def test_a_local_folder_of_the_same_name_wins(tmp_path):
    cache, _, _, _ = _hf_cache(tmp_path)
    work = tmp_path / "work"
    local = llama(work / "acme").model.rename(work / "acme" / "tiny-llama")
    ok(fastcast_in(work, {"HF_HUB_CACHE": cache}, "convert", "acme/tiny-llama", "-d", "bf16"))
    record = json.loads((work / "acme" / "tiny-llama-bf16" / "fastcast.json").read_text())
    assert record["source"] == str(local)


def test_repo_ids_in_a_batch(tmp_path):
    cache, _, _, _ = _hf_cache(tmp_path)
    model = llama(tmp_path).model
    r = fastcast_in(
        tmp_path, {"HF_HUB_CACHE": cache}, "convert", "acme/tiny-llama", model, "acme/absent",
        "-d", "bf16", "-o", tmp_path / "out",
    )  # fmt: skip
    assert r.returncode == 1 and "acme/absent" in r.stderr
    assert (tmp_path / "out" / "tiny-llama-bf16" / "fastcast.json").exists()
    assert (tmp_path / "out" / f"{model.name}-bf16" / "fastcast.json").exists()
