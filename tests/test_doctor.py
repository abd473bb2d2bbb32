"""``--doctor`` on this CPU machine: not ready, naming the missing weights and the missing GPU, in one screen."""

from __future__ import annotations

import io

import huggingface_hub.constants  # noqa: F401  (hub.cache_dir reads it)

from recon.config import load_config
from recon.doctor import NOT_READY, run_doctor


def test_doctor_names_missing_weights_and_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = io.StringIO()
    assert run_doctor(load_config(), out) == NOT_READY
    text = out.getvalue()
    assert "no CUDA GPU" in text
    assert "Zero123 weights missing: ashawkey/zero123-xl-diffusers" in text
    assert "safety checker weights missing: CompVis/stable-diffusion-safety-checker" in text
    assert "hf download" in text and "Traceback" not in text
    assert len(text.splitlines()) <= 24  # one screen


def test_doctor_finds_weights_in_the_cache_and_given_paths(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "models--ashawkey--zero123-xl-diffusers" / "snapshots" / "abc").mkdir(parents=True)
    checker = tmp_path / "checker"
    checker.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = io.StringIO()
    run_doctor(load_config(None, [f"gate.model={checker}"]), out)
    text = out.getvalue()
    assert "Zero123 weights: ashawkey/zero123-xl-diffusers: found" in text
    assert f"safety checker weights: {checker}: found" in text
    assert "weights missing" not in text


def test_doctor_from_the_command_line_is_one_screen_and_status_1(tmp_path, monkeypatch, capsys):
    from recon.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["--doctor"]) == NOT_READY
    captured = capsys.readouterr()
    assert "not ready:" in captured.out and "no CUDA GPU" in captured.out and "Traceback" not in captured.out + captured.err
