"""Start-up: every command is a new Python process, so what `import fastcast` loads is
paid on each run. The API's names load their modules on first use; these tests hold that
(and that lazy names still behave as plain attributes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastcast

#: Modules a conversion, a batch or a verify needs, and `import fastcast` should not load.
HEAVY = (
    "fastcast._convert",
    "fastcast._plan",
    "fastcast._batch",
    "fastcast._verify",
    "fastcast._inspect",
    "fastcast._conversion",
    "fastcast._source",
)


def loaded_after(code: str) -> list[str]:
    """The fastcast modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return [m for m in json.loads(out.splitlines()[-1]) if m.startswith("fastcast")]


@pytest.mark.parametrize(
    "code",
    [
        "import fastcast",
        "import fastcast.cli.main",
        "from fastcast.cli import main; main(['dtypes'])",
    ],
)
def test_starting_loads_no_pipeline(code):
    heavy = [m for m in loaded_after(code) if m.startswith(HEAVY)]
    assert heavy == []


def test_a_conversion_does_not_load_batch_or_verify(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    code = (
        f"from fastcast.cli import main; main(['convert', {str(tmp_path)!r}, '--dtype', 'bf16', "
        f"'-o', {str(tmp_path / 'out')!r}, '--quiet'])"
    )
    loaded = loaded_after(code)
    assert "fastcast._convert" in loaded
    assert [m for m in loaded if m.startswith(("fastcast._batch", "fastcast._verify"))] == []


@pytest.mark.parametrize("name", fastcast.__all__)
def test_every_public_name_resolves_as_an_attribute(name):
    value = getattr(fastcast, name)
    assert value is not None
    assert name in dir(fastcast)
    # Once resolved, the same object each time (cached in the module).
    assert getattr(fastcast, name) is value


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'convertt'"):
        fastcast.convertt  # noqa: B018
    assert not hasattr(fastcast, "_LAZY_MISSING")


def test_star_import_gives_every_public_name():
    namespace: dict[str, object] = {}
    exec("from fastcast import *", namespace)
    assert set(fastcast.__all__) <= set(namespace)
