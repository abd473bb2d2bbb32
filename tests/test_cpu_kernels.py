"""The fused CPU kernels (numba) against their pure-PyTorch references, and the fallback when numba fails."""

import logging

import pytest
import torch

from recon import accel
from recon.camera import Cameras, generate_rays
from recon.field import hash_grid_cpu
from recon.field.hash_grid import HashGrid
from recon.render import occupancy, occupancy_cpu

pytest.importorskip("numba")

# Dense levels (4, 8, 13 in a 2**12 table) and hashed ones (24, 42, 76).
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.8)


def grid_with_values(seed=0, **config):
    torch.manual_seed(seed)
    grid = HashGrid(**(config or SMALL))
    with torch.no_grad():
        grid.params.uniform_(-1.0, 1.0)  # order-one values, so differences would show
    return grid


def encode(grid, x, fused):
    grid.use_fused_cpu = fused
    grid.params.grad = None
    out = grid(x)
    upstream = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * upstream).sum().backward()
    return out.detach(), grid.params.grad.clone()


def test_fused_hash_grid_matches_pytorch_values_and_table_gradient():
    grid = grid_with_values()
    # random points, the faces and corners of the unit cube (where the last vertex wraps), and repeats
    x = torch.cat([torch.rand(5000, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0]] * 3)])
    reference, reference_grad = encode(grid, x, fused=False)
    fused, fused_grad = encode(grid, x, fused=True)
    assert hash_grid_cpu.kernels() is not None  # the fused path really ran
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert reference_grad.abs().sum() > 0
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-4)


def test_fused_hash_grid_is_used_only_where_it_applies(monkeypatch):
    calls = []
    real = hash_grid_cpu.fused_encode
    monkeypatch.setattr(hash_grid_cpu, "fused_encode", lambda *a: calls.append(1) or real(*a))
    grid = grid_with_values()
    grid(torch.rand(10, 3))
    assert len(calls) == 1
    grid(torch.rand(10, 3, requires_grad=True))  # the points' gradient (normals): PyTorch path
    grid_with_values(**dict(SMALL, n_features_per_level=4))(torch.rand(10, 3))  # a shape the kernels do not cover
    assert len(calls) == 1


def test_fused_march_is_bit_identical_to_the_pytorch_march():
    cameras = Cameras.make([0.0, 30.0, 75.0, -10.0], [0.0, 45.0, 170.0, -100.0], 2.0, 40.0)
    origins, directions = (t.reshape(-1, 3) for t in generate_rays(cameras, 48))
    binary = torch.rand(32, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.6
    radius, step = 0.7, 2.0 * 3**0.5 * 0.7 / 96
    t_near, t_far = occupancy.ray_box_intersection(origins, directions, radius)
    for offsets in (torch.zeros(origins.shape[0]), torch.rand(origins.shape[0], generator=torch.Generator().manual_seed(1))):
        args = (origins, directions, t_near, t_far, offsets, step, 97, binary, radius)
        reference = occupancy.march_occupied(*args)
        fused = occupancy_cpu.march_occupied(*args)
        assert reference[0].numel() > 10000
        for a, b in zip(reference, fused):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_numba_failure_falls_back_to_pytorch_with_one_notice(monkeypatch, caplog):
    """A kernel that cannot be built (numba missing or broken) costs speed, never a run."""
    grid = grid_with_values()
    x = torch.rand(300, 3)
    expected = encode(grid, x, fused=False)

    def broken():
        raise ImportError("No module named 'numba'")

    accel.forget(hash_grid_cpu.KERNELS_NAME)
    monkeypatch.setattr(hash_grid_cpu, "_build_kernels", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="recon"):
            first = encode(grid, x, fused=True)
            second = encode(grid, x, fused=True)
        notices = [r.getMessage() for r in caplog.records if hash_grid_cpu.KERNELS_NAME in r.getMessage()]
        assert len(notices) == 1 and "PyTorch hash grid" in notices[0] and "not installed" in notices[0]
        assert accel.report()[hash_grid_cpu.KERNELS_NAME].startswith("not installed")
        for got in (first, second):
            torch.testing.assert_close(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1])
    finally:
        accel.forget(hash_grid_cpu.KERNELS_NAME)


def test_reattached_features_give_the_encoding_gradient():
    """Features computed without gradients, joined back to the graph, backpropagate as a fresh encoding would."""
    grid = grid_with_values()
    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2000, grid.n_output_dims, generator=torch.Generator().manual_seed(5))
    fresh = grid(x)
    (fresh * upstream).sum().backward()
    expected = grid.params.grad.clone()
    grid.params.grad = None
    with torch.no_grad():
        features = grid(x)
    reattached = grid.reattach(features, x)
    assert reattached.requires_grad
    (reattached * upstream).sum().backward()
    torch.testing.assert_close(reattached.detach(), fresh.detach())
    torch.testing.assert_close(grid.params.grad, expected)
