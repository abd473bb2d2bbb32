"""Texturing: xatlas unwrap, baking an analytic albedo, seam filling, vertex colours."""

import pytest
import torch
import trimesh
from scipy import ndimage

from recon.camera import Cameras, generate_rays
from recon.mesh.data import MeshData
from recon.mesh.texture import bake_texture, bake_vertex_colors, fill_seams, query_albedo, unwrap
from recon.render.mesh_raster import rasterize_uv, render_mesh


def albedo(points: torch.Tensor) -> torch.Tensor:
    """A smooth colour field with values in [0.2, 0.8], so an unwritten black texel stands out."""
    return 0.5 + 0.3 * torch.sin(3.0 * points + torch.tensor([0.0, 2.0, 4.0]))


@pytest.fixture(scope="module")
def sphere() -> MeshData:
    mesh = trimesh.creation.icosphere(subdivisions=3)
    return MeshData(torch.tensor(mesh.vertices, dtype=torch.float32) * 0.6, torch.tensor(mesh.faces))


@pytest.fixture(scope="module")
def unwrapped(sphere) -> MeshData:
    return unwrap(sphere, size=256, padding=4)


def uv_areas(mesh: MeshData) -> torch.Tensor:
    a, b, c = mesh.uvs[mesh.face_uvs].unbind(1)
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])).abs()


def test_unwrap_keeps_geometry_and_lays_charts_out_without_overlap(sphere, unwrapped):
    assert torch.equal(unwrapped.vertices, sphere.vertices) and torch.equal(unwrapped.faces, sphere.faces)
    assert unwrapped.face_uvs.shape == sphere.faces.shape and unwrapped.face_uvs.dtype == torch.int64
    assert unwrapped.uvs.min() >= 0 and unwrapped.uvs.max() <= 1
    assert len(unwrapped.uvs) > len(sphere.vertices)  # chart seams split vertices in uv only
    areas = uv_areas(unwrapped)
    assert (areas > 0).all()
    # Without overlaps the rasterised coverage equals the summed triangle areas (up to edge texels).
    coverage = rasterize_uv(unwrapped.uvs, unwrapped.face_uvs, 512).mask.float().mean()
    assert abs(coverage - areas.sum()) < 0.03
    assert areas.sum() > 0.3  # the packing uses a fair part of the texture


def test_unwrap_keeps_each_uv_chart_a_copy_of_the_surface(unwrapped):
    # Edge lengths in uv are proportional to those in 3D within a chart (low distortion on a sphere),
    # which fails if face_uvs were attached to the wrong faces.
    corners3d = unwrapped.vertices[unwrapped.faces]
    corners_uv = unwrapped.uvs[unwrapped.face_uvs]
    length3d = (corners3d - corners3d.roll(1, dims=1)).norm(dim=-1)
    length_uv = (corners_uv - corners_uv.roll(1, dims=1)).norm(dim=-1)
    ratio = length_uv / length3d
    relative = ratio / ratio.median()
    assert (relative - 1).abs().median() < 0.1


def surface_points(out, cameras, size):
    """World points behind each pixel, from the rendered view-axis depth."""
    origins, directions = generate_rays(cameras, size)
    forward = -torch.nn.functional.normalize(cameras.position, dim=-1)
    distance = out["depth"] / (directions * forward[:, None, None]).sum(-1)
    return origins + directions * distance[..., None]


def test_baked_texture_renders_the_analytic_colours(unwrapped):
    baked = bake_texture(unwrapped, albedo, size=256, padding=4)
    assert baked.texture.shape == (256, 256, 3) and baked.has_texture
    cameras = Cameras.make([20.0, -30.0, 60.0], [0.0, 130.0, 250.0], 2.0, 45.0)
    out = render_mesh(baked, cameras, 96)
    mask = out["alpha"][..., 0] > 0
    expected = albedo(surface_points(out, cameras, 96)[mask])
    error = (out["rgb"][mask] - expected).abs()
    assert mask.sum() > 5000
    assert error.mean() < 0.01
    assert torch.quantile(error.max(dim=-1).values, 0.999) < 0.05  # no seams or cracks anywhere


def test_bake_unwraps_a_mesh_without_uvs(sphere):
    baked = bake_texture(sphere, albedo, size=128, padding=2)
    assert baked.has_texture and baked.texture.shape == (128, 128, 3)
    assert torch.equal(baked.faces, sphere.faces)


def test_seam_fill_covers_the_padding_with_nearest_chart_colours(unwrapped):
    baked = bake_texture(unwrapped, albedo, size=256, padding=4)
    mask = rasterize_uv(unwrapped.uvs, unwrapped.face_uvs, 256).mask[0]
    texture = baked.texture
    # No texel is left unwritten (black): every one holds a colour from the albedo's range.
    assert texture.min() >= 0.2 - 1e-6 and texture.max() <= 0.8 + 1e-6
    # Each texel within the padding holds the colour of a chart texel at the nearest distance.
    distance = torch.as_tensor(ndimage.distance_transform_edt((~mask).numpy()))
    ring = ~mask & (distance <= 4)
    assert ring.sum() > 1000
    # The nearest chart texel is at most 4 texels away, so a 9x9 window around each ring texel holds it.
    rows, cols = ring.nonzero().unbind(1)
    dr, dc = torch.meshgrid(torch.arange(-4, 5), torch.arange(-4, 5), indexing="ij")
    r = (rows[:, None] + dr.reshape(1, -1)).clamp(0, 255)
    c = (cols[:, None] + dc.reshape(1, -1)).clamp(0, 255)
    d2 = torch.where(mask[r, c], (r - rows[:, None]) ** 2 + (c - cols[:, None]) ** 2, 10**6)
    nearest = d2 == d2.min(dim=1, keepdim=True).values
    same_colour = (texture[r, c] - texture[rows, cols][:, None]).abs().amax(-1) < 1e-6
    assert (nearest & same_colour).any(dim=1).all()
    # Chart texels themselves are untouched by the fill.
    unfilled = torch.zeros_like(texture)
    unfilled[mask] = texture[mask]
    assert torch.equal(fill_seams(unfilled, mask)[mask], texture[mask])


def test_fill_seams_matches_brute_force_nearest():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 50, generator=generator) > 0.97
    texture = torch.rand(40, 50, 3, generator=generator) * mask[..., None]
    filled = fill_seams(texture, mask)
    rows, cols = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    src_r, src_c = mask.nonzero().unbind(1)
    d2 = (rows.reshape(-1, 1) - src_r[None]) ** 2 + (cols.reshape(-1, 1) - src_c[None]) ** 2
    best = d2.min(dim=1, keepdim=True).values
    candidates = texture[src_r, src_c]
    ok = ((filled.reshape(-1, 1, 3) - candidates[None]).abs().amax(-1) < 1e-7) & (d2 == best)
    assert ok.any(dim=1).all()


def test_vertex_colour_mode(sphere):
    coloured = bake_vertex_colors(sphere, albedo)
    assert coloured.vertex_colors.shape == sphere.vertices.shape and not coloured.has_texture
    assert torch.allclose(coloured.vertex_colors, albedo(sphere.vertices))
    cameras = Cameras.make(10.0, 45.0, 2.0, 45.0)
    out = render_mesh(coloured, cameras, 64)
    mask = out["alpha"][..., 0] > 0
    # Linear interpolation between vertices: close to the smooth field, not exact.
    error = (out["rgb"][mask] - albedo(surface_points(out, cameras, 64)[mask])).abs()
    assert error.mean() < 0.02


def test_query_albedo_chunks_and_clamps():
    sizes = []

    def field(points):
        sizes.append(len(points))
        return points * 2.0

    points = torch.linspace(-1, 1, 1000)[:, None].expand(-1, 3)
    colors = query_albedo(field, points, chunk=300)
    assert sizes == [300, 300, 300, 100]
    assert colors.min() == 0.0 and colors.max() == 1.0
    assert torch.allclose(colors[600], (points[600] * 2).clamp(0, 1))


def test_bake_speed_benchmark_writes_into_the_current_directory_outside_a_checkout(tmp_path, monkeypatch):
    # Installed users run benchmarks from anywhere: figures land where they
    # are, never inside the installed package.
    import json

    from recon.bench.bake_speed import main

    monkeypatch.chdir(tmp_path)
    main(["--grid", "24", "--size", "64", "--repeats", "1"])
    assert [p.name for p in tmp_path.iterdir()] == ["bake_speed.json"]
    result = json.loads((tmp_path / "bake_speed.json").read_text())
    assert result["mesh"]["faces"] > 500 and 0.2 < result["texel_coverage"] < 1.0
