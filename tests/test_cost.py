"""The cost model (recon/cost_model.py) and its report (recon/bench/cost.py).

The full-size architecture is priced by `python -m recon.bench.cost`; these
tests check the method on the tiny Zero123, where a step can also run for real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from recon.bench import cost
from recon.bench.procedural import crate, save_obj
from recon.config import load_config
from recon.cost_model import CUDA_CONTEXT_BYTES, GIB, USABLE_SHARE, PricedFit, StepShape, batch_sizes_for_budget, price_step
from recon.errors import BadInput
from recon.prior.architectures import TINY

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "recon" / "bench" / "results" / "cost.json"


@pytest.fixture(scope="module")
def tiny_fit():
    """One priced fit shared by the tests (building one runs a few thousand fake operations)."""
    return PricedFit(load_config("cpu", ["prior.image_size=64"]), TINY, torch.float32)


def test_modelled_peak_matches_the_allocators_measured_peak():
    """Fake tensors price a step within 15 % of what the CPU allocator reports for the same step run for real."""
    check = cost.check_memory("cpu", StepShape(batch=2, resolution=64, reference_rays=4096, samples_per_ray=24, normals=True))
    assert check["measured_gib"] > 0.05  # big enough that the comparison means something
    assert 0.85 <= check["ratio"] <= 1.15, check


def test_field_flops_follow_the_closed_form(tiny_fit):
    """Every extra sample costs the MLP's forward and backward: 6 x (inputs x hidden + hidden x 4) FLOPs."""
    fit = tiny_fit
    f = fit.cfg.field
    base = StepShape(batch=1, resolution=8, reference_rays=100, samples_per_ray=10)
    more = StepShape(batch=1, resolution=8, reference_rays=300, samples_per_ray=10)
    extra = price_step(fit, more).flops - price_step(fit, base).flops
    inputs = f.n_levels * f.n_features_per_level
    assert f.n_hidden_layers == 1
    assert extra == 200 * 10 * 6 * (inputs * f.hidden_dim + f.hidden_dim * 4)


def test_peak_grows_with_the_batch_and_resident_memory_does_not(tiny_fit):
    fit = tiny_fit
    costs = [price_step(fit, StepShape(batch=b, resolution=32, reference_rays=512, samples_per_ray=8)) for b in (1, 2, 4)]
    assert costs[0].peak_bytes < costs[1].peak_bytes < costs[2].peak_bytes
    assert costs[0].resident_bytes == costs[1].resident_bytes == costs[2].resident_bytes > 0


@pytest.mark.slow
def test_budget_picks_the_largest_batch_that_fits_and_refuses_one_that_nothing_fits():
    cfg = load_config("cpu", ["prior.image_size=64", "camera.batch_sizes=[4]", "fit.reference_rays=512"])
    fit = PricedFit(cfg, TINY, torch.float16)
    shape = cost.stage_shapes(cfg)[0]
    peaks = {b: price_step(fit, StepShape(b, shape.resolution, shape.reference_rays, shape.samples_per_ray)).peak_bytes for b in (2, 3)}
    card = lambda peak: (peak + CUDA_CONTEXT_BYTES) / USABLE_SHARE / GIB  # noqa: E731
    between = (card(peaks[2]) + card(peaks[3])) / 2
    assert batch_sizes_for_budget(cfg, between, shapes=TINY) == [2]
    assert batch_sizes_for_budget(cfg, card(peaks[3]) + 1e-6, shapes=TINY) == [3]
    assert batch_sizes_for_budget(cfg, 64.0, shapes=TINY) == [4]  # never above the preset's
    with pytest.raises(BadInput, match="even with one view"):
        batch_sizes_for_budget(cfg, CUDA_CONTEXT_BYTES / GIB, shapes=TINY)


def test_vram_flag_refuses_an_impossible_budget_before_any_directory(tmp_path, monkeypatch, capsys):
    import recon.cost_model

    from recon.cli import main

    monkeypatch.setattr(recon.cost_model, "FULL", TINY)  # the plumbing, not the full-size model
    mesh = save_obj(crate(), tmp_path / "crate")
    out = tmp_path / "run"
    code = main(["--reference-mesh", str(mesh), "--config", "cpu", "--output", str(out), "--vram", "1", "--quiet",
                 "camera.reference_resolution=512", "fit.reference_rays=0", "prior.image_size=64"])
    assert code == 2
    assert "fit.memory_budget_gb=1" in capsys.readouterr().err
    assert not out.exists()


def test_committed_report_matches_the_presets_and_the_readme():
    """cost.json prices today's presets, the default fits 16 GB and lowvram 8 GB, and the README shows its table."""
    results = json.loads(RESULTS.read_text())
    for name in cost.PRESETS:
        recipe = cost.preset_recipe(name)
        priced = results["recipes"][name]["stages"]
        assert [(s["batch"], s["resolution"], s["reference_rays"], s["samples_per_ray"], s["steps"]) for s in priced] == [
            (shape.batch, shape.resolution, shape.reference_rays, shape.samples_per_ray, steps) for shape, steps in recipe.stages
        ], f"{name}: the preset changed since cost.json was written; rerun python -m recon.bench.cost"
    assert results["recipes"]["zero123"]["fits_gib"]["16"]
    assert results["recipes"]["lowvram"]["fits_gib"]["8"]
    assert {"threestudio-zero123", "threestudio-stable-zero123"} <= set(results["recipes"])
    assert 0.85 <= results["memory_check"]["ratio"] <= 1.15
    readme = (ROOT / "README.md").read_text()
    assert cost.table(results) in readme
    peaks = json.loads((ROOT / "configs" / "modelled_peaks.json").read_text())  # what --doctor reads
    assert peaks == {name: round(results["recipes"][name]["peak_with_cuda_context_gib"], 2) for name in cost.PRESETS if name != "cpu"}


def test_doctor_names_the_presets_a_card_fits(monkeypatch):
    from recon import doctor

    monkeypatch.setattr(doctor, "modelled_peaks", lambda: {"zero123": 11.0, "lowvram": 5.0})
    assert doctor.presets_that_fit(8 * GIB) == "lowvram (5.0 GiB)"
    assert doctor.presets_that_fit(16 * GIB) == "lowvram (5.0 GiB), zero123 (11.0 GiB)"
    assert doctor.presets_that_fit(4 * GIB) == ""


@pytest.mark.slow
def test_report_on_a_tiny_model_has_every_figure():
    recipe = cost.preset_recipe("cpu")
    recipe.cfg = load_config("cpu", ["prior.kind=zero123", "prior.image_size=64"])
    report = cost.price_recipe(recipe, shapes=TINY, log=lambda message: None)
    assert report["stages"] and all(s["tflops_per_step"] > 0 and s["peak_gib"] > 0 for s in report["stages"])
    assert report["refine"]["tflops_per_step"] > 0 and report["pflops_refine"] > 0
    assert report["pflops_per_object"] > report["pflops_refine"]
    assert set(report["fits_gib"]) == {"8", "12", "16", "24"}
    assert re.search(r"\| cpu \| \d+ \|", cost.table({"recipes": {"cpu": report}}))
