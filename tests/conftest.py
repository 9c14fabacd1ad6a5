"""Shared fixtures. torch is the correctness oracle: where CI=true a test that
needs it fails when it is missing instead of skipping."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """Import ``module``; skip when absent locally, fail when absent in CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def torch() -> ModuleType:
    return require("torch")
