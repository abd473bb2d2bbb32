import math

import pytest

import torch

from recon import accel
from recon.config import FieldConfig, RenderConfig
from recon.field.field import RadianceField
from recon.render.occupancy import (
    NERFACC_KERNELS,
    NerfaccOccupancyGrid,
    TorchOccupancyGrid,
    before_opaque,
    evaluate_until_opaque,
    exclusive_sum_per_ray,
    ray_box_intersection,
    use_nerfacc,
)
from recon.render.volume import composite, render_rays, step_size


class SphereField(torch.nn.Module):
    """Analytic field: a solid sphere of constant density and a colour that varies with x."""

    def __init__(self, radius=0.7, sphere=0.4, sigma=30.0):
        super().__init__()
        self.radius, self.sphere, self.sigma = radius, sphere, sigma
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, points):
        inside = (points.norm(dim=-1) < self.sphere).float()
        colour = torch.stack([0.5 + 0.5 * points[:, 0], torch.full_like(points[:, 0], 0.2), torch.full_like(points[:, 0], 0.8)], -1)
        return self.sigma * inside + 0 * self.dummy, colour

    def density(self, points):
        return self.forward(points)[0]


def test_exclusive_sum_per_ray():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    rays = torch.tensor([0, 0, 2, 2, 2])
    assert torch.equal(exclusive_sum_per_ray(values, rays, 3), torch.tensor([0.0, 1.0, 0.0, 3.0, 7.0]))


def test_exclusive_sum_per_ray_keeps_small_sums_exact_in_large_batches():
    """A float32 running total over 20k rays would round each ray's sum by several units."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(5, 40, (20000,), generator=generator)
    rays = torch.repeat_interleave(torch.arange(20000), counts)
    values = torch.rand(rays.numel(), generator=generator) * 100.0
    got = exclusive_sum_per_ray(values, rays, 20000)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(rays.numel()) - starts[rays]
    last = rays[-1].item()
    # the last ray's sums, written out from its own values only
    own = values[starts[last] :]
    expected = torch.cat([torch.zeros(1), torch.cumsum(own.double(), 0)[:-1]]).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[starts[last] :], expected, rtol=0, atol=1e-3)
    assert (got[position == 0] == 0).all()


def test_front_to_back_evaluation_keeps_what_early_stop_keeps_and_evaluates_less():
    generator = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 60, (500,), generator=generator)
    rays = torch.repeat_interleave(torch.arange(500), counts)
    t_starts = torch.rand(rays.numel(), generator=generator)
    t_ends = t_starts + 0.02
    # rays of every kind: empty fog, soft, and hitting a wall of density 5000 somewhere along them
    density = torch.rand(rays.numel(), generator=generator) * 20.0
    density[torch.rand(rays.numel(), generator=generator) < 0.05] = 5000.0
    evaluated = []

    def evaluate(index):
        evaluated.append(index.numel())
        return density[index], density[index] * 2.0

    index, got, doubled = evaluate_until_opaque(evaluate, t_starts, t_ends, rays, 500)
    expected = before_opaque(density, t_starts, t_ends, rays, 500).nonzero().squeeze(1)
    assert torch.equal(index, expected)  # the same samples, in packed order
    assert torch.equal(got, density[expected]) and torch.equal(doubled, 2.0 * density[expected])
    assert sum(evaluated) < 0.8 * rays.numel()


def test_ray_box_intersection():
    origins = torch.tensor([[2.0, 0.0, 0.0], [2.0, 5.0, 0.0]])
    directions = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    near, far = ray_box_intersection(origins, directions, 0.5)
    assert torch.allclose(near[0], torch.tensor(1.5)) and torch.allclose(far[0], torch.tensor(2.5))
    assert near[1] >= far[1]  # misses


def _rays(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    origins = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * 2.0
    target = (torch.rand(n, 3, generator=g) - 0.5) * 0.6
    return origins, torch.nn.functional.normalize(target - origins, dim=-1)


def test_one_pass_render_without_gradients_matches_the_two_pass_render():
    """Without gradients the field is read once per occupied step and the same early stop applies."""
    torch.manual_seed(0)
    field = RadianceField(FieldConfig(n_levels=4, log2_hashmap_size=12, hidden_dim=16))
    cfg = RenderConfig(n_samples_per_ray=128, occupancy_resolution=16)
    grid = TorchOccupancyGrid(field.radius, 16, "cpu")
    origins, directions = _rays(256)
    two_pass = render_rays(field, grid, origins, directions, cfg, torch.ones(3), surface_opacity=0.5)
    with torch.no_grad():
        one_pass = render_rays(field, grid, origins, directions, cfg, torch.ones(3), surface_opacity=0.5)
    assert two_pass.n_samples == one_pass.n_samples > 0
    assert two_pass.rgb.requires_grad and not one_pass.rgb.requires_grad
    for name in ("rgb", "opacity", "accumulated_depth", "surface_distance"):
        torch.testing.assert_close(getattr(one_pass, name), getattr(two_pass, name).detach(), rtol=1e-5, atol=1e-6)


def test_render_matches_closed_form_opacity():
    field = SphereField()
    cfg = RenderConfig(n_samples_per_ray=512, occupancy_resolution=32)
    grid = TorchOccupancyGrid(field.radius, 32, "cpu")
    origins, directions = _rays()
    out = render_rays(field, grid, origins, directions, cfg, torch.ones(3))
    # chord length through the sphere -> exact opacity 1 - exp(-sigma * chord)
    b = (origins * directions).sum(-1)
    c = (origins**2).sum(-1) - field.sphere**2
    chord = 2 * torch.sqrt(torch.clamp(b**2 - c, min=0))
    expected = 1 - torch.exp(-field.sigma * chord)
    step = step_size(field.radius, cfg)
    assert torch.allclose(out.opacity[:, 0], expected, atol=field.sigma * step)


def test_occupancy_skipping_and_early_stop_keep_the_image():
    field = SphereField()
    cfg = RenderConfig(n_samples_per_ray=256, occupancy_resolution=32)
    full = TorchOccupancyGrid(field.radius, 32, "cpu")
    tight = TorchOccupancyGrid(field.radius, 32, "cpu")
    # one random point per cell can miss a sliver of the sphere; the running max over
    # several updates (as during training) catches every cell it touches
    for _ in range(20):
        tight.update(lambda x: field.density(x) * step_size(field.radius, cfg), cfg.occupancy_threshold)
    assert 0.0 < tight.occupied_fraction < 0.5
    origins, directions = _rays(256)
    a = render_rays(field, full, origins, directions, cfg, torch.ones(3))
    b = render_rays(field, tight, origins, directions, cfg, torch.ones(3))
    assert b.n_samples < 0.5 * a.n_samples
    # only empty space was skipped, apart from slivers of cells whose random probes
    # never landed inside the sphere (nerfacc's rule has the same blind spot)
    for full_image, skipped in ((a.rgb, b.rgb), (a.opacity, b.opacity)):
        error = (full_image - skipped).abs()
        assert error.mean() < 5e-4 and error.max() < 0.02


def test_dense_composite_matches_manual():
    t = torch.linspace(0, 1, 6)
    starts, ends = t[:-1].repeat(2), t[1:].repeat(2)
    rays = torch.tensor([0] * 5 + [1] * 5)
    sigma = torch.tensor([0.0, 1.0, 5.0, 0.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    values = torch.arange(10.0)[:, None]
    out = composite(rays, starts, ends, sigma, {"v": values}, 2)
    alpha = 1 - torch.exp(-sigma * 0.2)
    weights = []
    for r in range(2):
        a = alpha[r * 5 : r * 5 + 5]
        trans = torch.cumprod(torch.cat([torch.ones(1), 1 - a[:-1]]), 0)
        weights.append(a * trans)
    weights = torch.cat(weights)
    assert torch.allclose(out["weights"], weights, atol=1e-6)
    assert torch.allclose(out["v"][:, 0], torch.stack([(weights * values[:, 0])[:5].sum(), (weights * values[:, 0])[5:].sum()]), atol=1e-5)


def test_field_blob_and_normals():
    cfg = FieldConfig(n_levels=4, log2_hashmap_size=12, hidden_dim=16)
    field = RadianceField(cfg)
    centre, edge, outside = torch.tensor([[0.0, 0, 0]]), torch.tensor([[0.45, 0, 0]]), torch.tensor([[0.0, 0, 0.69]])
    assert field.density(centre) > 100 * field.density(edge) > 0
    assert field.density(torch.tensor([[0.0, 0, 0.8]])) == 0  # outside the box
    _, _, normal = field.density_and_normal(torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, -0.3]]))
    # the blob's density falls outward, so normals point away from the centre
    assert normal[0, 0] > 0.9 and normal[1, 2] < -0.9
    assert field.density(outside) < field.density(edge)
    assert math.isfinite(field.albedo(centre).sum().item())


def test_opacity_distance_is_where_the_ray_turns_opaque():
    from recon.render.volume import opacity_distance

    t = torch.arange(6.0)
    starts, ends = t[:-1].repeat(2), t[1:].repeat(2)
    rays = torch.tensor([0] * 5 + [1] * 5)
    weights = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1, 0.0, 0.1, 0.1, 0.0, 0.0])
    d = opacity_distance(weights, starts, ends, rays, 3)
    assert d[0, 0] == pytest.approx(2.5)  # 0.3 before sample 2 (0.4 wide): half of it reaches 0.5
    assert torch.isinf(d[1, 0]) and torch.isinf(d[2, 0])  # never half opaque; no samples at all
    low = opacity_distance(weights, starts, ends, rays, 3, level=0.2)
    assert low[0, 0] == pytest.approx(1.5)  # 0.1 before sample 1 (0.2 wide): half of it reaches 0.2
    assert low[1, 0] == pytest.approx(3.0)  # the second ray reaches 0.2 at the end of its sample 2


def test_sphere_surface_distance_matches_the_surface():
    field = SphereField(sigma=500.0)
    cfg = RenderConfig(n_samples_per_ray=512)
    grid = TorchOccupancyGrid(field.radius, 32, "cpu")
    origins = torch.tensor([[2.0, 0.0, 0.0]])
    for level in (0.5, 0.25):
        out = render_rays(field, grid, origins, torch.tensor([[-1.0, 0.0, 0.0]]), cfg, torch.ones(3), surface_opacity=level)
        assert out.surface_distance[0, 0] == pytest.approx(2.0 - field.sphere, abs=step_size(field.radius, cfg))


# ----------------------------------------------------------------------------- one function, two implementations
#
# The occupancy grid and the compositing run as nerfacc's CUDA kernels on a GPU and
# as PyTorch elsewhere. The closed-form tests below run on every implementation
# present (the CUDA ones are marked `cuda`: `python -m pytest -q -m cuda` on a GPU
# box); the `cuda` comparisons check the two against each other directly.

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GRIDS = ["torch-cpu", pytest.param("torch-cuda", marks=ON_CUDA), pytest.param("nerfacc-cuda", marks=ON_CUDA)]


def needs_nerfacc_kernels():
    """Skip unless nerfacc's CUDA kernels build and run on this GPU (recon falls back to PyTorch otherwise)."""
    if not use_nerfacc("cuda"):
        pytest.skip(f"needs nerfacc's CUDA kernels: {accel.report().get(NERFACC_KERNELS)}")


def new_grid(kind, radius, resolution):
    if kind == "nerfacc-cuda":
        needs_nerfacc_kernels()
        return NerfaccOccupancyGrid(radius, resolution, "cuda")
    return TorchOccupancyGrid(radius, resolution, kind.split("-")[1])


def ball(r):
    """Optical thickness 1 inside the ball of radius r about the origin, 0 outside."""
    return lambda points: (points.norm(dim=-1) < r).float()


def cell_distances(radius, resolution):
    """Nearest and farthest distance from the origin of each cell [G, G, G] of a grid over the box."""
    size = 2 * radius / resolution
    low = -radius + torch.arange(resolution) * size
    high = low + size
    nearest = torch.where((low <= 0) & (high >= 0), torch.zeros(resolution), torch.minimum(low.abs(), high.abs()))
    farthest = torch.maximum(low.abs(), high.abs())

    def norm(per_axis):
        x, y, z = torch.meshgrid(per_axis, per_axis, per_axis, indexing="ij")
        return (x**2 + y**2 + z**2).sqrt()

    return norm(nearest), norm(farthest)


@pytest.mark.parametrize("kind", GRIDS)
def test_grid_update_is_a_decaying_max_binarised_at_the_smaller_of_mean_and_threshold(kind):
    """A big ball once, then a small ball 100 times: the cells only the big ball filled decay by 0.95 per update."""
    grid = new_grid(kind, 0.7, 16)
    nearest, farthest = cell_distances(0.7, 16)
    core = farthest < 0.3  # inside both balls: every probe lands inside
    shell = (farthest < 0.55) & (nearest >= 0.3)  # inside the big ball only
    outside = nearest >= 0.55
    assert core.sum() == 80 and shell.sum() == 392
    generator = torch.Generator().manual_seed(0)
    grid.update(ball(0.55), threshold=0.01, generator=generator)
    shell_value = torch.tensor(1.0)
    # After k updates of the small ball the shell holds 0.95**k; the mean lies between what the
    # core and the shell give, (80 + 392 * 0.95**k) / 4096, and that plus every other cell at 1.
    # k = 20, threshold 0.5: 0.36 is above the mean (at most 0.29): occupied (not with max(mean, 0.5))
    # k = 80, threshold 0.01: 0.0165 is above 0.01, below the mean (at least 0.021): occupied
    # k = 100, threshold 0.01: 0.0059 is below both: empty
    expected = {20: True, 80: True, 100: False}
    for k in range(1, 101):
        threshold = 0.5 if k <= 20 else 0.01
        grid.update(ball(0.3), threshold=threshold, generator=generator)
        shell_value = shell_value * 0.95
        if k in expected:
            state = grid.state_dict()
            occupancy, binary = state["occupancy"].reshape(16, 16, 16), state["binary"]
            assert (occupancy[core] == 1.0).all() and (occupancy[outside] == 0.0).all()
            torch.testing.assert_close(occupancy[shell], shell_value.expand(392), rtol=1e-6, atol=0)
            assert binary[core].all() and not binary[outside].any()
            assert (binary[shell] == expected[k]).all(), k
            assert torch.equal(binary, occupancy > min(occupancy.mean().item(), threshold))


SLAB_START = -0.35  # x-cells 4 to 15 of 16 over [-0.7, 0.7] are occupied: x in [-0.35, 0.7)


def slab_grid(kind):
    grid = new_grid(kind, 0.7, 16)
    binary = torch.zeros(16, 16, 16, dtype=torch.bool)
    binary[4:] = True
    grid.load_state_dict({"occupancy": binary.float().reshape(-1), "binary": binary})
    return grid


def axis_rays(n, seed):
    """Rays from x = -2 towards +x (first half) and from x = +2 towards -x, slightly tilted; all cross both x faces."""
    generator = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.arange(n) < n // 2, 1.0, -1.0)
    origins = torch.cat([(-2.0 * sign)[:, None], (torch.rand(n, 2, generator=generator) - 0.5) * 0.6], 1)
    directions = torch.cat([sign[:, None], (torch.rand(n, 2, generator=generator) - 0.5) * 0.1], 1)
    return origins, torch.nn.functional.normalize(directions, dim=-1)


def expected_slab_samples(origins, directions, step, offsets):
    """Per ray, the steps t_near + (k + offset) * step whose midpoint is before the exit face and in the slab.

    Also the smallest distance of a midpoint from either boundary, along the ray: the test is only
    meaningful where float rounding cannot move a midpoint across one.
    """
    rays, starts, margin = [], [], math.inf
    for ray, (o, d, u) in enumerate(zip(origins.tolist(), directions.tolist(), offsets.tolist())):
        entry, exit_ = (-0.7, 0.7) if d[0] > 0 else (0.7, -0.7)
        t_near, t_far = (entry - o[0]) / d[0], (exit_ - o[0]) / d[0]
        t_slab = (SLAB_START - o[0]) / d[0]
        for k in range(int((t_far - t_near) / step) + 2):
            t_mid = t_near + (k + u + 0.5) * step
            margin = min(margin, abs(t_mid - t_far), abs(t_mid - t_slab))
            in_slab = o[0] + d[0] * t_mid >= SLAB_START
            if t_mid < t_far and in_slab:
                rays.append(ray)
                starts.append(t_mid - 0.5 * step)
    return torch.tensor(rays), torch.tensor(starts), margin


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("kind", GRIDS)
def test_grid_samples_fixed_steps_whose_midpoints_are_occupied_and_before_the_exit(kind, stratified):
    """The +x rays leave through occupied cells: a last step whose midpoint is inside counts, though it ends outside."""
    grid = slab_grid(kind)
    origins, directions = axis_rays(32, seed=1)
    step = 0.054  # 1.4 / 0.054 = 25.9 steps across the box
    offsets = torch.rand(32, generator=torch.Generator().manual_seed(2)) if stratified else torch.zeros(32)
    rays, starts, margin = expected_slab_samples(origins, directions, step, offsets)
    assert margin > 2e-4  # no midpoint within float rounding of a boundary
    device = torch.device(kind.split("-")[1])
    got = grid.sample(origins.to(device), directions.to(device), step, stratified, generator=torch.Generator().manual_seed(2))
    ray_indices, t_starts, t_ends = (t.cpu() for t in got)
    assert torch.equal(ray_indices, rays)
    torch.testing.assert_close(t_starts, starts, rtol=0, atol=2e-5)
    torch.testing.assert_close(t_ends - t_starts, torch.full_like(t_starts, step), rtol=0, atol=2e-5)
    # the rule with the end of the step inside the box instead would drop a step on these rays
    assert (origins[rays, 0] + directions[rays, 0] * (starts + step) > 0.7).sum() >= 4


@pytest.mark.parametrize("kind", GRIDS)
def test_grid_sampling_with_densities_stops_rays_at_transmittance_1e_4(kind):
    """Optical thickness 1 per step: the transmittance before step j is exp(-j), at least 1e-4 for j <= 9."""
    grid = slab_grid(kind)
    origins, directions = axis_rays(32, seed=1)
    step = 0.054  # 1.4 / 0.054 = 25.9 steps across the box
    rays, starts, _ = expected_slab_samples(origins, directions, step, torch.zeros(32))
    position = torch.arange(rays.numel()) - torch.searchsorted(rays, rays)  # index of each sample on its ray
    keep = position < 10
    assert (~keep).sum() > 100  # every ray crosses more than ten occupied steps

    def sigma_fn(t_starts, t_ends, ray_indices):
        return torch.full_like(t_starts, 1.0 / step)

    device = torch.device(kind.split("-")[1])
    ray_indices, t_starts, _ = (t.cpu() for t in grid.sample(origins.to(device), directions.to(device), step, False, sigma_fn=sigma_fn))
    assert torch.equal(ray_indices, rays[keep])
    torch.testing.assert_close(t_starts, starts[keep], rtol=0, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nerfacc_grid_updates_samples_and_renders_as_the_torch_grid():
    needs_nerfacc_kernels()
    field = SphereField().to("cuda")
    cfg = RenderConfig(n_samples_per_ray=256, occupancy_resolution=32)
    step = step_size(field.radius, cfg)
    reference, native = TorchOccupancyGrid(field.radius, 32, "cuda"), NerfaccOccupancyGrid(field.radius, 32, "cuda")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for grid in (reference, native):
            grid.update(lambda x: field.density(x) * step, cfg.occupancy_threshold, generator=generator)
    # Update: the same values and cells wherever every point of a cell is on one side of the sphere
    # (the two draw their random probe points from different generators).
    nearest, farthest = cell_distances(field.radius, 32)
    decided = ((farthest < field.sphere) | (nearest >= field.sphere)).reshape(-1)
    a, b = reference.state_dict(), native.state_dict()
    assert torch.equal(a["occupancy"][decided], b["occupancy"][decided])
    assert torch.equal(a["binary"].reshape(-1)[decided], b["binary"].reshape(-1)[decided])

    # Sampling through the same grid with the same generator: the same steps. nerfacc walks the
    # cells (DDA) and adds up its steps, so a rare midpoint within rounding of a cell face may differ.
    native.load_state_dict(reference.state_dict())
    origins, directions = (t.cuda() for t in _rays(512, seed=4))
    samples = [grid.sample(origins, directions, step, True, generator=torch.Generator().manual_seed(5)) for grid in (reference, native)]
    counts = [torch.bincount(s[0], minlength=512) for s in samples]
    same = counts[0] == counts[1]
    assert same.float().mean() > 0.99 and counts[0].sum() > 10000
    on_same = [same[s[0]] for s in samples]
    for x, y in zip(samples[0], samples[1]):
        torch.testing.assert_close(y[on_same[1]].to(x.dtype), x[on_same[0]], rtol=0, atol=1e-4)

    images = [render_rays(field, grid, origins, directions, cfg, torch.ones(3, device="cuda")) for grid in (reference, native)]
    for name in ("opacity", "rgb"):
        error = (getattr(images[0], name) - getattr(images[1], name)).abs()
        assert error.mean() < 1e-3 and error.max() < 0.05, name


def uniform_rays(device):
    """Rays of 5, 0, 40 and 1 steps of length 0.05 from t = 1 through density 3, packed; each ray's value is its index."""
    counts = torch.tensor([5, 0, 40, 1])
    rays = torch.repeat_interleave(torch.arange(4), counts)
    position = torch.cat([torch.arange(c) for c in counts.tolist()])
    t_starts = 1.0 + 0.05 * position.float()
    values = rays.float()[:, None].expand(-1, 2)
    tensors = (rays, t_starts, t_starts + 0.05, torch.full_like(t_starts, 3.0), values)
    return counts, position, [t.to(device) for t in tensors]


COMPOSITING = ["dense-cpu", pytest.param("packed-cuda", marks=ON_CUDA)]


@pytest.mark.parametrize("path", COMPOSITING)
def test_composite_of_uniform_density_has_the_closed_form_weights(path):
    device = path.split("-")[1]
    if device == "cuda":
        needs_nerfacc_kernels()  # composite() takes nerfacc's packed kernels on a GPU where they run
    counts, position, (rays, t_starts, t_ends, density, values) = uniform_rays(device)
    out = {k: v.cpu() for k, v in composite(rays, t_starts, t_ends, density, {"v": values}, 4).items()}
    keep = math.exp(-3.0 * 0.05)  # transmittance through one step
    # weight of step i: transmittance before it times its opacity; opacity: 1 - exp(-sigma * length)
    torch.testing.assert_close(out["weights"], keep ** position.float() * (1 - keep), rtol=1e-5, atol=1e-7)
    opacity = 1 - torch.exp(-3.0 * 0.05 * counts.float())
    torch.testing.assert_close(out["opacity"][:, 0], opacity, rtol=1e-5, atol=1e-7)
    assert out["opacity"][1, 0] == 0  # no samples: nothing accumulated
    torch.testing.assert_close(out["v"], torch.arange(4.0)[:, None] * opacity[:, None].expand(-1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_compositing_matches_the_dense_layout(monkeypatch):
    """nerfacc's packed kernels against the padded [rays, samples] layout the CPU uses, values and gradients."""
    needs_nerfacc_kernels()
    import recon.render.volume as volume

    generator = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 50, (300,), generator=generator)
    rays = torch.repeat_interleave(torch.arange(300), counts)
    t_starts = torch.rand(rays.numel(), generator=generator).sort().values + rays  # increasing along each ray
    t_ends = t_starts + torch.rand(rays.numel(), generator=generator) * 0.05
    density = torch.rand(rays.numel(), generator=generator) * 40.0
    colour = torch.rand(rays.numel(), 3, generator=generator)
    upstream = {"rgb": torch.randn(300, 3, generator=generator), "opacity": torch.randn(300, 1, generator=generator)}
    results = []
    for packed in (True, False):
        monkeypatch.setattr(volume, "use_nerfacc", lambda device, packed=packed: packed)
        leaves = [x.cuda().requires_grad_(True) for x in (density, colour)]
        out = volume.composite(rays.cuda(), t_starts.cuda(), t_ends.cuda(), leaves[0], {"rgb": leaves[1]}, 300)
        loss = sum((out[name] * upstream[name].cuda()).sum() for name in upstream)
        grads = torch.autograd.grad(loss, leaves)
        results.append({**{name: out[name].detach().cpu() for name in ("rgb", "opacity", "weights")}, "d_density": grads[0].cpu(), "d_colour": grads[1].cpu()})
    packed, dense = results
    assert packed["opacity"].max() > 0.9 and (counts == 0).any()
    for name in packed:
        torch.testing.assert_close(packed[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)
