"""Faults for real: a full disk (a small tmpfs), permission denied (an
unprivileged user), SIGKILL and SIGINT mid-run. Afterwards nothing is under a
final name (finished shards wait in the output's hidden staging folder), the
input is intact, and --resume finishes the job, reusing the completed shards
only after checking them.

Mounting and switching users need root; where that is missing these tests skip
locally and fail in CI (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fastcast
from conftest import require
from folders import snapshot

HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, why: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"CI must be able to run this: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A 240 MB fp32 Llama-shaped checkpoint (with a ``1_Pooling/`` subfolder): 8
    output shards at 15 MB in bf16."""
    path = tmp_path_factory.mktemp("faults") / "model"
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "benches" / "make_model.py"),
            str(path),
            "--size",
            "240MB",
            "--shard-size",
            "100MB",
        ],
        check=True,
        capture_output=True,
    )
    return path


def cli(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "fastcast.cli", *args]


STAGING = ".fastcast-staging"


def nothing_in_place(out: Path) -> None:
    """An unfinished run put nothing under a final name; the shards it finished are
    whole (each parses and has exactly the size its header says)."""
    assert sorted(p.name for p in out.iterdir()) == [STAGING]
    for shard in (out / STAGING).glob("*.safetensors"):
        header = fastcast.read_header(shard)  # raises on a partial file
        assert header["data_start"] > 0


def staged_shards(out: Path) -> list[str]:
    return sorted(p.name for p in (out / STAGING).glob("model-*.safetensors"))


def fresh_copy(model: Path, tmp_path: Path) -> Path:
    ref = tmp_path / "reference"
    fastcast.convert(model, "bf16", output=ref, shard_size="15MB", progress=False)
    return ref


def same_files(a: Path, b: Path) -> None:
    assert snapshot(a) == snapshot(b)


def interrupted_run(model: Path, out: Path, sig: int) -> subprocess.CompletedProcess[str]:
    """A conversion that gets ``sig`` once two shards are finished (sent from a thread
    of the process itself, see kill_at.py, so that it comes in time on a busy machine)."""
    point = "journaled:2" + ("@INT" if sig == signal.SIGINT else "")
    r = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "kill_at.py"), point, "--",
         "convert", str(model), "-o", str(out), "--dtype", "bf16", "--shard-size", "15MB",
         "--threads", "1", "--max-memory", "512KiB"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if r.returncode in (0, 3):
        pytest.fail(f"the conversion finished before the signal: {r.stderr}")
    return r


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_reusing_checked_shards(tmp_path, big_model, sig):
    before = snapshot(big_model)
    out = tmp_path / "out"
    r = interrupted_run(big_model, out, sig)
    assert r.returncode in (-signal.SIGKILL, 130), r.stderr
    nothing_in_place(out)
    if sig == signal.SIGINT:
        assert not list(out.rglob("*.fastcast-partial")), "Ctrl-C cleans its partial file"
        assert "--resume" in r.stderr, "Ctrl-C says how to finish the run"
    done = staged_shards(out)
    assert len(done) >= 2

    again = subprocess.run(cli("convert", str(big_model), "-o", str(out), "--dtype", "bf16",
                               "--shard-size", "15MB"), capture_output=True, text=True,
                           check=False)  # fmt: skip
    assert again.returncode == 1 and "pass --resume to finish it" in again.stderr

    resumed = subprocess.run(cli("convert", str(big_model), "-o", str(out), "--dtype", "bf16",
                                 "--shard-size", "15MB", "--resume"), capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {len(done)} shard(s) reused after checking" in resumed.stdout
    same_files(out, fresh_copy(big_model, tmp_path))
    assert snapshot(big_model) == before


def test_resume_redoes_a_shard_that_changed(tmp_path, big_model):
    out = tmp_path / "out"
    interrupted_run(big_model, out, signal.SIGKILL)
    first = out / STAGING / staged_shards(out)[0]
    raw = bytearray(first.read_bytes())
    raw[-5] ^= 0xFF  # silent corruption of a completed shard
    first.write_bytes(bytes(raw))
    report = fastcast.convert(
        big_model, "bf16", output=out, shard_size="15MB", resume=True, progress=False
    )
    assert first.name not in report.reused and report.reused
    same_files(out, fresh_copy(big_model, tmp_path))


def test_resume_refuses_other_settings(tmp_path, big_model):
    out = tmp_path / "out"
    interrupted_run(big_model, out, signal.SIGKILL)
    # It says what differs (it said "other inputs or settings" before issue 26).
    with pytest.raises(fastcast.OutputExistsError, match=r"used dtype BF16 \(now F16\)"):
        fastcast.convert(
            big_model, "fp16", output=out, shard_size="15MB", resume=True, progress=False
        )


def test_resume_of_a_fresh_or_finished_output(tmp_path, big_model):
    new = tmp_path / "new"
    report = fastcast.convert(
        big_model, "bf16", output=new, shard_size="15MB", resume=True, progress=False
    )
    assert report.reused == [] and not report.already_done
    assert sorted(p.name for p in new.iterdir())[:2] == ["1_Pooling", "config.json"]
    assert not (new / STAGING).exists()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in new.rglob("*") if p.is_file()}
    r = subprocess.run(cli("convert", str(big_model), "-o", str(new), "--dtype", "bf16",
                           "--shard-size", "15MB", "--resume"), capture_output=True, text=True,
                       check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "already converted" in r.stdout and "nothing to do" in r.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in new.rglob("*") if p.is_file()}
    assert after == before, "a finished output is left exactly as it was"
    with pytest.raises(
        fastcast.OutputExistsError, match=r"finished conversion .made with dtype BF16 .now F16"
    ):
        fastcast.convert(big_model, "fp16", output=new, shard_size="15MB", resume=True,
                         progress=False)  # fmt: skip


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, check=False)  # fmt: skip
    return r.returncode == 0


def test_disk_full_mid_run_then_resume(tmp_path, big_model, monkeypatch):
    disk = tmp_path / "disk"
    need(os.geteuid() == 0 and mount_tmpfs(disk, "50m"), "mounting a small tmpfs needs root")
    try:
        before = snapshot(big_model)
        out = disk / "out"
        # Let the up-front space check pass so that the disk really fills mid-run.
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))
        with pytest.raises(fastcast.InsufficientSpaceError, match="No space left on device"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fastcast.convert(big_model, "bf16", output=out, shard_size="15MB", progress=False)
        monkeypatch.undo()
        nothing_in_place(out)
        assert not list(out.rglob("*.fastcast-partial"))
        completed = staged_shards(out)
        assert 1 <= len(completed) < 8
        assert snapshot(big_model) == before

        # Without the override the up-front check now refuses, with the numbers.
        with pytest.raises(fastcast.InsufficientSpaceError, match="not enough disk space"):
            fastcast.convert(
                big_model, "bf16", output=out, shard_size="15MB", resume=True, progress=False
            )
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        report = fastcast.convert(
            big_model, "bf16", output=out, shard_size="15MB", resume=True, progress=False
        )
        assert sorted(report.reused) == completed
        same_files(out, fresh_copy(big_model, tmp_path))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def unprivileged(cmd: list[str]) -> list[str]:
    """Run as root but without the capabilities that bypass file permissions, so
    that mode bits apply (an unprivileged user could not reach the interpreter)."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def test_permission_denied_is_one_clean_line(tmp_path, big_model):
    need(os.geteuid() == 0 and shutil.which("setpriv") is not None,
         "dropping the permission-bypassing capabilities needs root and setpriv")  # fmt: skip
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # nobody may create anything in here
    try:
        r = subprocess.run(unprivileged(cli("convert", str(big_model), "-o",
                                            str(locked / "out"), "--dtype", "bf16")),
                           capture_output=True, text=True, check=False)  # fmt: skip
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("fastcast: error: ") and "Permission denied" in lines[-1]
        assert "Traceback" not in r.stderr and not (locked / "out").exists()
    finally:
        locked.chmod(0o755)

    model = tmp_path / "model"
    shutil.copytree(big_model, model)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.chmod(0o000)
    r = subprocess.run(unprivileged(cli("convert", str(model), "-o", str(tmp_path / "o2"),
                                        "--dtype", "bf16")), capture_output=True, text=True,
                       check=False)  # fmt: skip
    assert r.returncode == 1 and "Permission denied" in r.stderr and shard.name in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_unlisted_tensor_and_unreadable_json(tmp_path, torch):
    st = require("safetensors.torch")
    from folders import save_folder, tensors

    src = save_folder(st, tmp_path / "m", tensors(torch), shards=2)
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.step"]
    index.write_text(json.dumps(data))
    with pytest.raises(fastcast.ModelFolderError, match=r"does not list tensor 'model\.step'"):
        fastcast.convert(src, "bf16", output=tmp_path / "o", progress=False)
    index.write_text("{not json")
    with pytest.raises(fastcast.ModelFolderError, match="not valid JSON"):
        fastcast.convert(src, "bf16", output=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_an_index_and_its_shards_that_disagree_are_told_with_counts(tmp_path, torch):
    """The index cross-check, both ways: a tensor the index puts in a shard that lacks
    it is told first (naming the index, the tensor, the shard, how many more), then
    tensors shards hold that the index does not list, counted over every shard."""
    st = require("safetensors.torch")
    from folders import save_folder, tensors

    src = save_folder(st, tmp_path / "m", tensors(torch), shards=2)
    index = src / "model.safetensors.index.json"
    first, second = sorted(src.glob("model-*.safetensors"))
    data = json.loads(index.read_text())
    weight_map = data["weight_map"]
    moved = [n for n, f in weight_map.items() if f == second.name][:3]
    for name in moved:
        weight_map[name] = first.name
    index.write_text(json.dumps(data))
    with pytest.raises(fastcast.ModelFolderError) as e:
        fastcast.convert(src, "bf16", output=tmp_path / "o", progress=False)
    assert str(e.value) == (
        f"{index}: says {moved[0]!r} is in {first.name}, but {first} has no such tensor "
        "(and 2 more)"
    )

    data["weight_map"] = weight_map = {
        n: f for n, f in json.loads(index.read_text())["weight_map"].items() if n not in moved
    }
    for name in moved:
        weight_map[name] = second.name
    dropped = [next(n for n, f in weight_map.items() if f == s.name) for s in (first, second)]
    for name in dropped:
        del weight_map[name]
    index.write_text(json.dumps(data))
    with pytest.raises(fastcast.ModelFolderError) as e:
        fastcast.convert(src, "bf16", output=tmp_path / "o", progress=False)
    assert str(e.value) == (
        f"{index}: does not list tensor {dropped[0]!r}, which {first.name} holds (and 1 more)"
    )
    assert not (tmp_path / "o").exists()


def test_the_resume_fingerprint_tells_plans_apart(tmp_path):
    """A resumed run must have the plan of the run it finishes: the fingerprint is
    the same for the same plan, and differs when the tensors' dtypes (``--keep``) or
    the shards' split differ."""
    from fastcast._conversion.fingerprint import fingerprint
    from fastcast._plan.shards import plan_conversion
    from fastcast._source.folder import TorchOptions, open_model

    st = require("safetensors.numpy")
    import numpy as np

    tmp_path.joinpath("config.json").write_text('{"torch_dtype": "float32"}')
    tensors = {f"layer.{i}.weight": np.full(64, i, np.float32) for i in range(6)}
    st.save_file(tensors, str(tmp_path / "model.safetensors"))
    folder = open_model(tmp_path)

    def stamp(keep: list[str], shard_size: int = 1 << 20) -> str:
        plan = plan_conversion(folder, "BF16", shard_size, keep=keep)
        return fingerprint(folder, plan, "saturate", TorchOptions())

    assert stamp([]) == stamp([])
    assert stamp([]) != stamp(["*"])  # same names in the same order: dtypes alone
    assert stamp([]) != stamp(["layer.3.weight"])
    assert stamp(["layer.3.weight"]) != stamp(["layer.4.weight"])
    assert stamp([]) != stamp([], shard_size=300)
