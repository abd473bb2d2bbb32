import math

import pytest

import torch

from recon.config import FieldConfig, RenderConfig
from recon.field.field import RadianceField
from recon.render.occupancy import TorchOccupancyGrid, before_opaque, evaluate_until_opaque, exclusive_sum_per_ray, ray_box_intersection
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
