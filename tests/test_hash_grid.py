"""The hash-grid encoding against a plain per-level, per-corner reference of tiny-cuda-nn's grid."""

import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch

from recon import accel
from recon.config import FieldConfig, load_config
from recon.errors import BadInput
from recon.field.hash_grid import TCNN, HashGrid, make_hash_grid

# A small grid with both kinds of level: resolutions 4, 8, 13 are dense in a
# 2**12 table, 24, 42, 76 are hashed.
SMALL = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.8)
PRIMES = (1, 2654435761, 805459861)


def reference_encode(x, params, n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale):
    """tcnn's grid written out one level and one corner at a time, straight from its definition."""
    table = params.view(-1, n_features_per_level)
    table_size = 2**log2_hashmap_size
    n_dims = x.shape[1]
    outputs, offset = [], 0
    for level in range(n_levels):
        # tcnn: scale = exp2f(level * log2f(per_level_scale)) * base - 1, all in float32.
        scale = np.exp2(np.float32(level) * np.log2(np.float32(per_level_scale))) * np.float32(base_resolution)
        scale = float(scale - np.float32(1.0))
        resolution = math.ceil(scale) + 1
        dense = resolution**n_dims <= table_size
        level_size = min(math.ceil(resolution**n_dims / 8) * 8, table_size)

        pos = x * scale + 0.5
        cell = torch.floor(pos.detach())
        frac = pos - cell
        cell = cell.long()
        level_out = 0
        for corner in itertools.product((0, 1), repeat=n_dims):
            weight = 1
            for axis, high in enumerate(corner):
                weight = weight * (frac[:, axis] if high else 1 - frac[:, axis])
            vertex = [cell[:, axis] + high for axis, high in enumerate(corner)]
            if dense:
                index = sum(vertex[axis] * resolution**axis for axis in range(n_dims))
            else:
                index = 0
                for axis in range(n_dims):
                    index = index ^ ((vertex[axis] * PRIMES[axis]) % 2**32)  # uint32 products
            index = index % level_size
            level_out = level_out + weight[:, None] * table[offset + index]
        outputs.append(level_out)
        offset += level_size
    return torch.cat(outputs, dim=1)


def make_grid(config, seed=0):
    torch.manual_seed(seed)
    grid = HashGrid(**config)
    with torch.no_grad():
        # Values of order one, not the 1e-4 of the initialisation, so that the comparisons mean something.
        grid.params.uniform_(-1.0, 1.0)
    return grid


def encode_both(grid, config, x):
    """(module output, reference output) with separate leaves, for comparing gradients."""
    x_module = x.clone().requires_grad_(True)
    x_reference = x.clone().requires_grad_(True)
    params_reference = grid.params.detach().clone().requires_grad_(True)
    return (
        (grid(x_module), x_module, grid.params),
        (reference_encode(x_reference, params_reference, **config), x_reference, params_reference),
    )


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        dict(SMALL, n_features_per_level=4, log2_hashmap_size=14),  # more features, other dense/hashed split
        dict(SMALL, n_features_per_level=1, n_input_dims=2),  # 2D grid, single feature
    ],
)
def test_matches_reference_values_and_gradients(config):
    grid = make_grid(config)
    reference_config = {k: v for k, v in config.items() if k != "n_input_dims"}
    x = torch.rand(3000, config.get("n_input_dims", 3), generator=torch.Generator().manual_seed(1))
    (out, x_m, params_m), (ref, x_r, params_r) = encode_both(grid, reference_config, x)
    assert out.shape == (3000, config["n_levels"] * config["n_features_per_level"]) == ref.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    upstream = torch.randn_like(out)
    grad_params, grad_x = torch.autograd.grad((out * upstream).sum(), [params_m, x_m])
    ref_params, ref_x = torch.autograd.grad((ref * upstream).sum(), [params_r, x_r])
    assert grad_params.abs().sum() > 0 and grad_x.abs().sum() > 0
    torch.testing.assert_close(grad_params, ref_params, rtol=1e-4, atol=1e-4)
    # d/dx carries the level scale (up to ~75 here), hence the looser absolute tolerance.
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-4, atol=1e-3)


def test_second_derivatives_for_normal_losses():
    """Losses on normals (d density / dx) backpropagate into the table: needs create_graph through the grid."""
    grid = make_grid(SMALL)
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(2))
    (out, x_m, params_m), (ref, x_r, params_r) = encode_both(grid, SMALL, x)
    upstream = torch.randn_like(out)
    direction = torch.randn(500, 3)

    def second(output, x_leaf, params_leaf):
        (grad_x,) = torch.autograd.grad((output * upstream).sum(), x_leaf, create_graph=True)
        return torch.autograd.grad((grad_x * direction).sum(), params_leaf)[0]

    got, expected = second(out, x_m, params_m), second(ref, x_r, params_r)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_recomputing_in_the_backward_pass_gives_the_same_gradients(monkeypatch):
    """Training on many points encodes them in chunks recomputed in the backward pass:
    values, table gradients and the second derivatives of normal losses are unchanged."""
    import recon.field.hash_grid as hash_grid

    monkeypatch.setattr(hash_grid, "RECOMPUTE_CHUNK", 64)  # several chunks for 300 points
    grid = HashGrid(6, 2, 10, 4, 1.7)
    grid.use_fused_cpu = False
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(300, 3, generator=generator, requires_grad=True)
    weight = torch.randn(300, grid.n_output_dims, generator=generator)

    def run(recompute: bool):
        grid.recompute_in_backward = recompute
        grid.params.grad = None
        features = grid(x)
        (dx,) = torch.autograd.grad((features * weight).sum(), x, create_graph=True)
        (dx.square().sum() + features.square().sum()).backward()
        return features.detach(), dx.detach(), grid.params.grad.clone()

    for kept, recomputed in zip(run(False), run(True)):
        torch.testing.assert_close(recomputed, kept, rtol=1e-5, atol=1e-6)
    assert run(False)[2].abs().sum() > 0


def test_points_on_the_faces_of_the_unit_cube():
    """x = 1 lands past the last vertex on some levels (the +0.5 offset): tcnn wraps, the index stays in range."""
    grid = make_grid(SMALL)
    x = torch.tensor(list(itertools.product((0.0, 0.5, 1.0), repeat=3)))
    (out, x_m, _), (ref, x_r, _) = encode_both(grid, SMALL, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(x_m.grad).all()
    torch.testing.assert_close(x_m.grad, x_r.grad, rtol=1e-4, atol=1e-3)
    cell = torch.floor(x.t() * grid.scales[:, None, None] + 0.5).long()  # [L, d, N]
    assert (cell[0] + 1 == grid.resolutions[0]).any()  # the case this test is about does occur
    index = grid.corner_indices(cell)
    assert index.min() >= 0 and index.max() < grid.n_table_entries


def test_dense_and_hashed_levels():
    # 12 levels, base 16, x1.3 per level: scale = 16 * 1.3**l - 1 -> resolutions 16, 21, 28, 36, 46, ...;
    # 36**3 = 46656 fits 2**16 = 65536 entries, 46**3 = 97336 does not.
    cpu = HashGrid(12, 2, 16, 16, 1.3)
    assert cpu.resolutions[:5] == [16, 21, 28, 36, 46]
    assert cpu.level_is_dense == [True] * 4 + [False] * 8
    # A grid that exactly fills its table is still dense: 16**3 == 2**12; 17**3 is hashed.
    edge = HashGrid(2, 2, 12, 16, 17 / 16)
    assert edge.resolutions == [16, 17]
    assert edge.level_is_dense == [True, False]
    assert edge.level_sizes == [4096, 4096]

    # Dense indices are the row-major vertex numbers (x fastest); hashed ones the xor of prime products.
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 7, 9]])
    cell = vertices.t().unsqueeze(0).expand(2, -1, -1)  # [L, d, N]
    index = edge.corner_indices(cell)[:, 0]  # corner 0 is the cell's low vertex
    assert index[0].tolist() == [0, 1, 16, 256, 5 + 7 * 16 + 9 * 256]
    hashed = [(x ^ (y * PRIMES[1]) ^ (z * PRIMES[2])) % 2**32 % 4096 for x, y, z in vertices.tolist()]
    assert (index[1] - 4096).tolist() == hashed


def test_parameter_count_and_initialisation():
    # Per level min(next_multiple(res**3, 8), 2**16) rows of 2 features:
    # 16**3 + 9264 (21**3 = 9261 rounded up) + 28**3 + 36**3 + 8 hashed levels of 2**16.
    cpu = HashGrid(12, 2, 16, 16, 1.3)
    assert cpu.params.numel() == 2 * (4096 + 9264 + 21952 + 46656 + 8 * 65536)
    assert [name for name, _ in cpu.named_parameters()] == ["params"]
    assert list(cpu.state_dict()) == ["params"]  # tcnn's key: checkpoints move between the two
    assert cpu.params.abs().max() <= 1e-4
    assert cpu.params.std() > 0.5e-4  # uniform(-1e-4, 1e-4) has std 0.58e-4
    assert cpu.n_output_dims == 24
    # The default FieldConfig: resolutions 16, 24, 34, 49, 71 dense (rounded up to multiples of 8), 11 hashed levels.
    default = HashGrid(16, 2, 19, 16, 1.447269)
    assert default.resolutions[:6] == [16, 24, 34, 49, 71, 102]
    assert default.params.numel() == 2 * (4096 + 13824 + 39304 + 117656 + 357912 + 11 * 2**19)


def test_make_hash_grid_on_cpu():
    cfg = load_config("cpu").field
    grid = make_hash_grid(cfg, "cpu")
    assert isinstance(grid, HashGrid)
    assert grid.n_output_dims == cfg.n_levels * cfg.n_features_per_level
    out = grid(torch.rand(10, 3, dtype=torch.float64))  # any float input, float32 out
    assert out.shape == (10, grid.n_output_dims) and out.dtype == torch.float32
    with pytest.raises(BadInput, match="use_tcnn"):
        make_hash_grid(FieldConfig(use_tcnn="always"), "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    grid = make_grid(SMALL)
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(3))
    x_cpu, x_gpu = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    out_cpu = grid(x_cpu)
    gpu = make_grid(SMALL).cuda()
    out_gpu = gpu(x_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out_cpu)
    out_cpu.backward(upstream)
    out_gpu.backward(upstream.cuda())
    torch.testing.assert_close(gpu.params.grad.cpu(), grid.params.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-3)


ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
WITH_TCNN = ON_CUDA + [pytest.mark.skipif(importlib.util.find_spec("tinycudann") is None, reason="needs tinycudann")]


def tcnn_grid(config):
    """tiny-cuda-nn's grid for ``config`` on the GPU; skips where tinycudann is installed but does not run."""
    fused = make_hash_grid(FieldConfig(**config), "cuda")
    if isinstance(fused, HashGrid):
        pytest.skip(f"needs a working tinycudann: {accel.report().get(TCNN)}")
    return fused


@pytest.mark.parametrize("implementation", ["torch-cpu", pytest.param("torch-cuda", marks=ON_CUDA), pytest.param("tcnn-cuda", marks=WITH_TCNN)])
def test_dense_levels_interpolate_a_linear_table_exactly(implementation):
    """d-linear interpolation reproduces a linear function: vertex values a . v + b give a . pos + b at pos = x * scale + 0.5."""
    weights = torch.tensor([[0.05, -0.03, 0.02, 0.1], [-0.02, 0.04, 0.06, -0.3]])  # per feature: a, then b
    reference = HashGrid(**SMALL)
    table = torch.zeros(reference.params.numel() // 2, 2)
    offset = 0
    for size, dense, resolution in zip(reference.level_sizes, reference.level_is_dense, reference.resolutions):
        if dense:
            index = torch.arange(resolution**3)  # x fastest
            vertex = torch.stack([index % resolution, index // resolution % resolution, index // resolution**2], -1).float()
            table[offset : offset + resolution**3] = vertex @ weights[:, :3].T + weights[:, 3]
        offset += size
    assert reference.level_is_dense == [True, True, True, False, False, False]
    device = implementation.split("-")[1]
    grid = tcnn_grid(SMALL) if implementation == "tcnn-cuda" else HashGrid(**SMALL).to(device)
    grid.load_state_dict({"params": table.reshape(-1).to(device)})
    # below 0.8 every cell's upper vertex is on the grid (at 1 the last one wraps around)
    x = 0.02 + 0.78 * torch.rand(1000, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = grid(x.to(device)).cpu()
    for level in range(3):
        pos = x * reference.scales[level] + 0.5
        expected = pos @ weights[:, :3].T + weights[:, 3]
        tolerance = 1e-2 if implementation == "tcnn-cuda" else 1e-5  # tcnn interpolates in half precision
        torch.testing.assert_close(out[:, 2 * level : 2 * level + 2], expected, rtol=0, atol=tolerance)


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("tinycudann") is None, reason="needs tinycudann")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tcnn_matches_the_torch_hash_grid():
    """Same config, same parameters: the same encoding and table gradient, up to tcnn's half precision."""
    grid = make_grid(SMALL)
    fused = tcnn_grid(SMALL)
    assert fused.n_output_dims == 12
    fused.load_state_dict(grid.state_dict())
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(3))
    out, out_fused = grid(x), fused(x.cuda())
    assert out_fused.shape == (4096, 12) and out_fused.dtype == torch.float32
    torch.testing.assert_close(out_fused.cpu(), out.detach(), rtol=1e-2, atol=1e-2)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    (out_fused * upstream.cuda()).sum().backward()
    error = (fused.params.grad.cpu() - grid.params.grad).norm() / grid.params.grad.norm()
    assert error < 1e-2
