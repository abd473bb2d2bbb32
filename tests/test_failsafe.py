"""Optional native pieces fail safe: when nerfacc's kernels or tiny-cuda-nn cannot load or build,
recon says so once and runs on its PyTorch implementations.

No GPU here, so the tests let the CPU stand in for one (NATIVE_DEVICE_TYPES) and
make the native piece fail the way it does on a real box: at import, or when
its kernels are built on first use.
"""

from __future__ import annotations

import logging

import pytest
import torch

import recon.field.hash_grid as hash_grid
import recon.render.occupancy as occupancy
from recon import accel
from recon.config import FieldConfig, load_config
from recon.fit import _ReferenceTarget, fit_step, new_fit_state
from recon.prepare import ReferenceView


@pytest.fixture
def cpu_as_gpu(monkeypatch):
    """The CPU plays the GPU: recon asks for the native pieces there."""
    monkeypatch.setattr(occupancy, "NATIVE_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(hash_grid, "NATIVE_DEVICE_TYPES", ("cpu",))
    yield
    accel.forget(occupancy.NERFACC_KERNELS)
    accel.forget(hash_grid.TCNN)


def fail_at_import():
    raise ImportError("No module named 'nerfacc.cuda'")


def fail_at_first_call():
    raise RuntimeError("Error building extension 'nerfacc_cuda': ninja: build stopped: subcommand failed.")


class StandInPrior:
    """A prior whose SDS pulls every view towards grey: enough to take a fit step."""

    def sds_loss(self, images, cameras, step):
        return {"loss_sds": ((images - 0.5) ** 2).mean(), "t": 500.0}


@pytest.mark.parametrize("failure", [fail_at_import, fail_at_first_call])
def test_a_fit_step_runs_on_the_torch_grid_when_nerfacc_fails(cpu_as_gpu, monkeypatch, caplog, failure):
    monkeypatch.setattr(occupancy, "_build_nerfacc_kernels", failure)
    cfg = load_config("cpu", ["camera.resolutions=[16]", "camera.reference_resolution=32", "fit.reference_rays=128", "field.use_tcnn=never"])
    with caplog.at_level(logging.WARNING, logger="recon"):
        state = new_fit_state(cfg, "cpu")
        assert isinstance(state.occupancy, occupancy.TorchOccupancyGrid)
        rgba = torch.zeros(64, 64, 4)
        rgba[16:48, 16:48] = 1.0
        target = _ReferenceTarget(ReferenceView(rgba), cfg, "cpu")
        stats = [fit_step(state, StandInPrior(), target, cfg) for _ in range(2)]
        new_fit_state(cfg, "cpu")  # asked again: no second notice
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)
    notices = [r.getMessage() for r in caplog.records if occupancy.NERFACC_KERNELS in r.getMessage()]
    assert len(notices) == 1 and "using the PyTorch occupancy grid and compositing instead" in notices[0]
    assert accel.report()[occupancy.NERFACC_KERNELS].startswith("not installed" if failure is fail_at_import else "failed to build")


@pytest.mark.parametrize("failure", [fail_at_import, fail_at_first_call])
def test_the_torch_hash_grid_stands_in_for_tcnn(cpu_as_gpu, monkeypatch, caplog, failure):
    monkeypatch.setattr(hash_grid, "_build_tcnn", failure)
    with caplog.at_level(logging.WARNING, logger="recon"):
        grids = [hash_grid.make_hash_grid(FieldConfig(n_levels=4, log2_hashmap_size=10), "cpu") for _ in range(2)]
    assert all(isinstance(grid, hash_grid.HashGrid) for grid in grids)
    assert grids[0](torch.rand(5, 3)).shape == (5, grids[0].n_output_dims)
    notices = [r.getMessage() for r in caplog.records if hash_grid.TCNN in r.getMessage()]
    assert len(notices) == 1 and "using the PyTorch hash grid instead" in notices[0]


def test_without_a_gpu_nothing_native_is_probed(monkeypatch):
    monkeypatch.setattr(occupancy, "_build_nerfacc_kernels", lambda: pytest.fail("probed nerfacc on the CPU"))
    assert not occupancy.use_nerfacc("cpu")
    assert isinstance(occupancy.make_occupancy_grid(0.7, 8, "cpu"), occupancy.TorchOccupancyGrid)
