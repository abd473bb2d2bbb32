"""One rule for model names and the hub's offline mode, shared by Zero123 and the safety checker.

The two loaders once had copies that disagreed: a bare name was a path for the
gate and a hub id for Zero123, and offline mode was read at call time by one
and frozen at import by the other. These tests pin the one behaviour kept.
"""

from __future__ import annotations

import huggingface_hub
import huggingface_hub.constants
import pytest

from recon import hub
from recon.errors import MissingWeights
from recon.prior.zero123_loading import load_zero123


@pytest.mark.parametrize("name", ["zero123-xl", "ashawkey/zero123-xl-diffusers", "CompVis/stable-diffusion-safety-checker"])
def test_names_not_on_disk_are_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not hub.looks_like_path(name)


@pytest.mark.parametrize("name", ["./weights", "/abs/weights", "~/weights", "a/b/c", "model.ckpt", "w.safetensors", "dir\\sub"])
def test_names_written_as_paths_are_paths(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.looks_like_path(name)


def test_a_bare_name_that_exists_on_disk_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checker").mkdir()
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "model").mkdir()
    assert hub.looks_like_path("checker") and hub.looks_like_path("owner/model")


def test_offline_mode_is_read_when_asked(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported
    assert hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.offline()


def test_zero123_honours_offline_set_after_import(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("went online while offline"))
    with pytest.raises(MissingWeights, match="hf download someone/not-cached"):
        load_zero123("someone/not-cached", cache_dir=str(tmp_path))


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.cache_dir() == str(tmp_path / "cache")
