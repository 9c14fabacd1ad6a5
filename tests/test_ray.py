"""``--executor ray`` on a local Ray cluster: the same bytes as the local executor,
and a worker SIGKILLed mid-shard costs a retry, not the batch."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import fastcast
from commands import cli
from conftest import require
from folders import snapshot
from zoo import llama, sentence_transformers

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs for the module (start-up costs seconds), of its own:
    ``address="local"`` never joins a cluster already running on the machine (after
    following README's recipe, say), which would refuse ``num_cpus``."""
    ray = require("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=100 << 20, _node_ip_address="127.0.0.1",
             logging_level="ERROR")  # fmt: skip
    yield ray
    ray.shutdown()


def local_and_ray(models, tmp_path, **options):
    local = fastcast.convert_batch(models, "bf16", output_dir=tmp_path / "local", **options)
    on_ray = fastcast.convert_batch(
        models, "bf16", output_dir=tmp_path / "ray", executor="ray", threads=1, **options
    )
    return local, on_ray


def test_ray_writes_what_the_local_executor_writes(ray_cluster, tmp_path):
    models = [llama(tmp_path).model, sentence_transformers(tmp_path).model]
    local, on_ray = local_and_ray(models, tmp_path, shard_size="1KB")
    assert local.ok and on_ray.ok, on_ray.summary()
    assert on_ray.executor == "ray"
    for m in models:
        assert snapshot(tmp_path / "ray" / f"{m.name}-bf16") == snapshot(
            tmp_path / "local" / f"{m.name}-bf16"
        )
    # Every attempt's temporary file and journal is gone.
    assert not [p for p in (tmp_path / "ray").rglob("*") if "attempt-" in p.name]


def test_a_broken_model_fails_alone_on_ray(ray_cluster, tmp_path):
    good = llama(tmp_path).model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    batch = fastcast.convert_batch([bad, good], "bf16", output_dir=tmp_path / "o", executor="ray")
    assert [r.status for r in batch.results] == ["failed", "converted"]
    assert "\n" not in (batch.results[0].error or "") and str(bad) in (batch.results[0].error or "")


def open_partial(root: Path) -> list[int]:
    """Pids of processes (Ray workers) holding a partial shard below ``root`` open."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(root)) and "attempt-" in target:
                    pids.append(int(proc.name))
                    break
        except OSError:
            continue
    return pids


def big_model(tmp_path: Path) -> Path:
    """An fp32 model of 3 x 48 MB tensors: shards that take a moment to write."""
    import numpy as np

    st = require("safetensors.numpy")
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": rng.standard_normal((3072, 4096), np.float32) for i in range(3)}
    st.save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="finds the worker via /proc")
def test_a_worker_killed_mid_shard_is_retried(ray_cluster, tmp_path):
    model = big_model(tmp_path)
    out = tmp_path / "ray"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for pid in open_partial(out):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer)
    thread.start()
    on_ray = fastcast.convert_batch(
        [model], "bf16", output_dir=out, executor="ray", threads=1, shard_size="50MB",
        max_memory="8MiB", fsync=True,
    )  # fmt: skip
    thread.join()
    assert killed, "no worker was caught mid-shard"
    assert on_ray.ok, on_ray.summary()
    fastcast.convert(model, "bf16", output=tmp_path / "local", shard_size="50MB", progress=False)
    assert snapshot(out / "big-bf16") == snapshot(tmp_path / "local")


def test_without_ray_one_line_says_how_to_install(tmp_path, monkeypatch):
    """The CLI in a process where ``import ray`` fails."""
    model = llama(tmp_path).model
    shim = tmp_path / "noray"
    (shim / "ray").mkdir(parents=True)
    (shim / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    r = cli("convert", model, "-d", "bf16", "--executor", "ray")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        == "fastcast: error: the ray executor needs Ray: pip install 'fastcast[ray]'"
    )


def test_tasks_no_node_can_run_fail_in_one_line(ray_cluster, tmp_path):
    """Was: --threads 4 on 2-CPU nodes asked every task for 4 CPUs and Ray waited
    forever, with no fastcast output. Now refused before anything is written."""
    model = llama(tmp_path).model
    began = time.monotonic()
    with pytest.raises(ValueError, match=r"--threads 4: .* the largest node of the cluster has 2"):
        fastcast.convert_batch([model], "bf16", output_dir=tmp_path / "o", executor="ray",
                               threads=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"--max-memory .* largest node"):
        fastcast.convert_batch([model], "bf16", output_dir=tmp_path / "o", executor="ray",
                               max_memory="100TB")  # fmt: skip
    assert time.monotonic() - began < 60
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
