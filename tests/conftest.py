"""Shared test fixtures: where the reference data lives, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """``$I3D_REFERENCE`` or ``<project>/../shared/reference``."""
    return Path(os.environ.get("I3D_REFERENCE", ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference() -> Path:
    """The shared reference fixtures; missing → skip locally, fail under CI."""
    path = reference_dir()
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference fixtures not found at {path} (required under CI)")
        pytest.skip(f"reference fixtures not found at {path}; set I3D_REFERENCE")
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
