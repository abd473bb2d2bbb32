"""Fixtures shared by the tests that run the command line, the API and the app on tiny models."""

from __future__ import annotations

import pytest

from test_gate import save, tiny_checker
from tiny_zero123 import build_tiny_zero123


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    """A tiny random Zero123 in the diffusers layout with a cc_projection folder."""
    return build_tiny_zero123(tmp_path_factory.mktemp("prior") / "tiny zero123", layout="cc_projection")


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    """A tiny safety checker that passes ordinary photos, saved as a local folder."""
    return save(tiny_checker(), tmp_path_factory.mktemp("checker") / "checker")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory, so that default outputs/ land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
