"""README's Ray recipe, followed as written on a fresh machine: a token generated, a
head started with token authentication, the conversion run against it. Its own
module: the cluster is stopped with ``ray stop`` at the end, which stops every Ray
process of the machine (the other module's local cluster is gone by then)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from commands import ok, refused
from conftest import require
from folders import snapshot
from zoo import sentence_transformers

pytestmark = pytest.mark.ray


def ray_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``ray ARGS`` (its console script, by module: no PATH needed)."""
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args],
        capture_output=True, text=True, check=False, env=env, timeout=180,
    )  # fmt: skip


def fastcast_cli(env: dict[str, str], *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcast.cli", *map(str, args)],
        capture_output=True, text=True, check=False, env=env, timeout=180,
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def token_cluster(tmp_path):
    """A one-node cluster started as README says, token authentication on, with a home
    of its own (the token file lives there): yields (address, the env that has the
    token, the env that lacks it)."""
    require("ray")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    home = tmp_path / "home"
    home.mkdir()
    with_token = {**base, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    generated = ray_cli(with_token, "get-auth-token", "--generate")
    assert generated.returncode == 0, generated.stderr
    assert (home / ".ray" / "auth_token").exists()
    port = free_port()
    started = ray_cli(with_token, "start", "--head", "--port", str(port), "--num-cpus", "2",
                      "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                      "--disable-usage-stats")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{port}", with_token, {**base, "HOME": str(home)}
    finally:
        ray_cli(with_token, "stop")


def test_the_recipe_with_token_authentication(token_cluster, tmp_path):
    address, with_token, without = token_cluster
    model = sentence_transformers(tmp_path).model
    out = tmp_path / "on-ray"
    r = fastcast_cli(with_token, "convert", model, "-o", out, "--dtype", "bf16",
                     "--executor", "ray", "--ray-address", address, "--threads", "2")  # fmt: skip
    ok(r)
    local = tmp_path / "local"
    ok(fastcast_cli(without, "convert", model, "-o", local, "--dtype", "bf16"))
    assert snapshot(out / f"{model.name}-bf16") == snapshot(local)
    # Without the auth mode on this side: one line that says what is missing.
    r = fastcast_cli(without, "convert", model, "-o", tmp_path / "x", "--dtype", "bf16",
                     "--executor", "ray", "--ray-address", address)  # fmt: skip
    line = refused(r, "cannot join the Ray cluster at " + address, "RAY_AUTH_MODE=token")
    assert line
    assert not Path(tmp_path / "x").exists()
