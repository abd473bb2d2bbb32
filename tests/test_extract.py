import math

import numpy as np
import pytest
import torch
import trimesh

from recon.config import ExtractConfig
from recon.errors import ReconError
from recon.mesh.extract import auto_threshold, extract_mesh, sample_grid

RADIUS = 0.7  # the field's box, as in FieldConfig


def _trimesh(mesh):
    return trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)


def _ball(centre, radius, value=50.0):
    """Occupancy-style density: ``value`` inside a ball, 0 outside."""
    centre = torch.tensor(centre, dtype=torch.float32)
    return lambda p: value * ((p - centre).norm(dim=-1) < radius).float()


def _smooth_ball(radius, peak=100.0, width=0.01):
    """Density that crosses peak/2 exactly at ``radius``."""

    def density(points):
        assert points.dtype == torch.float32 and points.shape[-1] == 3
        return peak * torch.sigmoid((radius - points.norm(dim=-1)) / width)

    return density


def _voxel(resolution, extent):
    return extent / (resolution - 1)


def test_sphere_radius_orientation_and_closure():
    mesh = extract_mesh(_smooth_ball(0.4), RADIUS, ExtractConfig(method="density", resolution=64, threshold=50.0))
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    distance = mesh.vertices.norm(dim=-1)
    voxel = _voxel(64, 0.8 + 4 * 2 * RADIUS / 64)  # the fine box: the ball plus the coarse padding
    assert (distance - 0.4).abs().max() < voxel
    tm = _trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent
    # Outward normals <=> positive signed volume, close to the ball's.
    assert tm.volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.03)
    # And each face normal points away from the centre.
    assert (np.einsum("ij,ij->i", tm.face_normals, tm.triangles_center) > 0).all()


def test_off_centre_object_maps_back_to_world():
    centre = (0.25, -0.1, 0.3)
    mesh = extract_mesh(_ball(centre, 0.2), RADIUS, ExtractConfig(method="density", resolution=48))
    middle = (mesh.vertices.max(0).values + mesh.vertices.min(0).values) / 2
    assert torch.allclose(middle, torch.tensor(centre), atol=0.02)


def test_floater_removed_and_both_blobs_kept():
    blob_a, blob_b, floater = _ball((-0.3, 0, 0), 0.2), _ball((0.3, 0, 0), 0.2), _ball((0, 0, 0.5), 0.02)
    density = lambda p: blob_a(p) + blob_b(p) + floater(p)  # noqa: E731
    # The floater has ~1% of a blob's faces, below the default 2%. No smoothing:
    # the blur alone would erase a floater this thin, and this tests the filter.
    mesh = extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=64, smoothing=0.0))
    vertices = mesh.vertices
    assert not ((vertices - torch.tensor([0, 0, 0.5])).norm(dim=-1) < 0.1).any()
    assert ((vertices - torch.tensor([-0.3, 0, 0])).norm(dim=-1) < 0.25).any()
    assert ((vertices - torch.tensor([0.3, 0, 0])).norm(dim=-1) < 0.25).any()
    assert len(_trimesh(mesh).split(only_watertight=False)) == 2
    # Without the filter, the floater is there: the test above can fail.
    unfiltered = extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=64, min_component_ratio=0.0, smoothing=0.0))
    assert ((unfiltered.vertices - torch.tensor([0, 0, 0.5])).norm(dim=-1) < 0.1).any()


def test_enclosed_cavity_is_filled():
    """A hollow shell meshes as a solid ball: SDS never sees inside, so the asset is its outer surface."""
    density = lambda p: 50.0 * ((p.norm(dim=-1) < 0.4) & (p.norm(dim=-1) > 0.25)).float()  # noqa: E731
    mesh = extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=64, min_component_ratio=0.0))
    tm = _trimesh(mesh)
    assert tm.volume == pytest.approx(4 / 3 * math.pi * 0.4**3, rel=0.05)
    assert len(tm.split(only_watertight=False)) == 1 and mesh.vertices.norm(dim=-1).min() > 0.35


def test_surface_closes_at_the_box_boundary():
    """An object filling the whole box still gives a closed surface (the padding)."""
    mesh = extract_mesh(lambda p: torch.full_like(p[:, 0], 50.0), RADIUS, ExtractConfig(method="density", resolution=32))
    tm = _trimesh(mesh)
    assert tm.is_watertight and tm.volume > 0
    assert mesh.vertices.abs().max() <= RADIUS + 1e-5
    assert tm.volume == pytest.approx((2 * RADIUS) ** 3, rel=0.1)


def test_decimation_honours_max_faces():
    full = extract_mesh(_smooth_ball(0.4), RADIUS, ExtractConfig(method="density", resolution=64))
    assert len(full.faces) > 4000
    mesh = extract_mesh(_smooth_ball(0.4), RADIUS, ExtractConfig(method="density", resolution=64, max_faces=1500))
    assert 1000 < len(mesh.faces) <= 1500
    tm = _trimesh(mesh)
    assert tm.volume > 0 and tm.is_winding_consistent
    assert (mesh.vertices.norm(dim=-1) - 0.4).abs().max() < 0.02


def test_auto_threshold_rule():
    box = 2 * RADIUS
    voxel = 0.01
    dense = torch.tensor([0.0, 1e4])  # a trained NeRF: one voxel of it is half opaque
    assert auto_threshold(dense, voxel, box) == pytest.approx(math.log(2) / voxel)
    soft = torch.tensor([0.0, 10.0])  # a soft blob: its half maximum
    assert auto_threshold(soft, voxel, box) == pytest.approx(5.0)
    faint = np.array([0.0, 0.1])  # invisible: never below what is opaque across the box
    assert auto_threshold(faint, voxel, box) == pytest.approx(math.log(2) / box)


def test_auto_threshold_on_scaled_occupancy():
    """sigma = 50 * inside: the level falls between the two values; the surface is the ball's."""
    mesh = extract_mesh(_ball((0, 0, 0), 0.4), RADIUS, ExtractConfig(method="density", resolution=64))
    voxel = _voxel(64, 0.8 + 4 * 2 * RADIUS / 64)
    assert (mesh.vertices.norm(dim=-1) - 0.4).abs().max() < voxel
    assert _trimesh(mesh).is_watertight


def test_auto_threshold_on_gaussian_blob():
    """A soft blob's surface is its half-maximum contour: r = s sqrt(2 ln 2)."""
    s = 0.15
    density = lambda p: 10.0 * torch.exp(-(p**2).sum(-1) / (2 * s**2))  # noqa: E731
    mesh = extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=64))
    distance = mesh.vertices.norm(dim=-1)
    assert (distance - s * math.sqrt(2 * math.log(2))).abs().max() < 0.01


def test_auto_threshold_on_sharp_dense_blob():
    """A dense field: the surface is where one voxel becomes half opaque, outside the half-maximum."""
    s = 0.15
    density = lambda p: 1e4 * torch.exp(-(p**2).sum(-1) / (2 * s**2))  # noqa: E731
    mesh = extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=64))
    radius = float(mesh.vertices.norm(dim=-1).mean())
    assert radius > s * math.sqrt(2 * math.log(2)) + 0.05
    # The density at the surface is ln 2 per voxel for a voxel of the fine grid.
    voxel = _voxel(64, 2 * radius + 4 * 2 * RADIUS / 64)
    at_surface = 1e4 * math.exp(-(radius**2) / (2 * s**2))
    assert at_surface == pytest.approx(math.log(2) / voxel, rel=0.1)


@pytest.mark.parametrize(
    "density, threshold",
    [
        (lambda p: torch.zeros(len(p)), None),
        (lambda p: torch.full((len(p),), 0.1), None),  # too faint to render anything
        (_ball((0, 0, 0), 0.3), 80.0),  # nothing reaches an explicit level
    ],
)
def test_empty_field_is_a_clear_error(density, threshold):
    with pytest.raises(ReconError, match="the field is empty"):
        extract_mesh(density, RADIUS, ExtractConfig(method="density", resolution=32, threshold=threshold))


def test_nan_density_reads_as_empty():
    with pytest.raises(ReconError, match="empty"):
        extract_mesh(lambda p: torch.full((len(p),), float("nan")), RADIUS, ExtractConfig(method="density", resolution=16))


def test_sample_grid_chunks_index_points_correctly():
    low, spacing, shape = np.array([-0.5, -0.25, 0.0]), 0.1, (4, 3, 5)
    coordinate_code = lambda p: p[:, 0] * 100 + p[:, 1] * 10 + p[:, 2]  # noqa: E731
    small = sample_grid(coordinate_code, low, spacing, shape, chunk=7)
    large = sample_grid(coordinate_code, low, spacing, shape, chunk=1000)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    expected = (low[0] + i * spacing) * 100 + (low[1] + j * spacing) * 10 + (low[2] + k * spacing)
    np.testing.assert_allclose(small, expected, atol=1e-4)
    np.testing.assert_array_equal(small, large)


def test_points_go_to_the_device_of_the_field_module():
    """``field.density`` gets its points on the field's device (meta stands in for a GPU here)."""
    from recon.mesh.extract import _device_of

    field = torch.nn.Linear(3, 1)
    assert _device_of(field.forward) == torch.device("cpu")
    assert _device_of(field.to("meta").forward) == torch.device("meta")
    assert _device_of(lambda p: p[:, 0]) == torch.device("cpu")


def _sphere_depth_views(radius, resolution=64):
    """Exact depth/opacity 'renders' of a sphere from rings of cameras (what the field would show)."""
    from recon.camera import Cameras, generate_rays, orbit_cameras
    from recon.mesh.extract import DepthViews

    rings = [orbit_cameras(8, e, 2.0, 40.0) for e in (-10.0, 15.0, 40.0, 60.0)]
    cameras = Cameras(*(torch.cat([getattr(r, n) for r in rings]) for n in ("elevation", "azimuth", "distance", "fovy")))
    origins, directions = generate_rays(cameras, resolution)
    b = (origins * directions).sum(-1)
    c = (origins**2).sum(-1) - radius**2
    hit = b**2 - c > 0
    distance = torch.where(hit, -b - torch.sqrt((b**2 - c).clamp(min=0)), torch.full_like(b, float("inf")))
    return DepthViews(cameras, distance, hit.float())


def test_carving_from_rendered_depth_recovers_the_shape():
    """A leaky, noisy density inside does not matter: the solid comes from what the views show."""
    views = _sphere_depth_views(0.35)
    noise = torch.Generator().manual_seed(0)
    table = torch.rand(64, 64, 64, generator=noise) * 40.0

    def spongy(points):  # density that is high only in random voxels of the ball: no closed level set
        index = ((points / RADIUS + 1) * 0.5 * 63).round().long().clamp(0, 63)
        return table[index[:, 0], index[:, 1], index[:, 2]] * (points.norm(dim=-1) < 0.35)

    mesh = extract_mesh(spongy, RADIUS, ExtractConfig(resolution=64, carve_margin=1.0), views=views)
    tm = _trimesh(mesh)
    assert tm.is_watertight and len(tm.split(only_watertight=False)) == 1
    assert tm.volume == pytest.approx(4 / 3 * math.pi * 0.35**3, rel=0.08)
    assert (mesh.vertices.norm(dim=-1) - 0.35).abs().mean() < 0.015


def test_the_density_method_ignores_views():
    views = _sphere_depth_views(0.35)
    mesh = extract_mesh(_ball((0, 0, 0), 0.2), RADIUS, ExtractConfig(method="density", resolution=48, threshold=25.0), views=views)
    assert (mesh.vertices.norm(dim=-1) - 0.2).abs().mean() < 0.02


def test_carving_places_the_surface_between_samples():
    """Carving values are continuous, so the mesh lands well inside a voxel of the true sphere."""
    views = _sphere_depth_views(0.35, resolution=128)
    cfg = ExtractConfig(resolution=48)
    mesh = extract_mesh(_ball((0, 0, 0), 0.35), RADIUS, cfg, views=views)
    voxel = 2 * RADIUS / (cfg.resolution - 1)  # at most; the fine grid spans only the object's box
    radial_error = (mesh.vertices.norm(dim=-1) - 0.35).abs()
    assert radial_error.mean() < 0.25 * voxel
    assert radial_error.max() < voxel


def test_carving_reads_a_soft_silhouette_and_depth_at_low_opacity():
    """One view of a flat, partly opaque wall: a soft fringe counts as solid, a faint haze does not."""
    from recon.camera import Cameras
    from recon.mesh.extract import CARVE_SILHOUETTE_OPACITY, DepthViews, carve_values

    camera = Cameras.make(0.0, 0.0, 2.0, 40.0)
    wall = torch.full((1, 16, 16), 2.0)  # every ray reaches the carving opacity 2 units from the camera
    on_axis = camera.position[0] * (1 - torch.tensor([[1.5], [2.0], [2.5]]) / 2.0)  # in front of, on, behind the wall

    def values(opacity):
        return carve_values(on_axis, DepthViews(camera, wall, torch.full((1, 16, 16), opacity)), margin=0.1, ramp=0.2)

    fringe = values(CARVE_SILHOUETTE_OPACITY + 0.05)
    assert fringe[0] == 0.0  # well in front of the wall: empty
    assert fringe[1] >= 0.5 and fringe[2] >= 0.5  # on and behind the wall: solid, though the pixel is far from opaque
    haze = values(CARVE_SILHOUETTE_OPACITY - 0.05)
    assert (haze < 0.5).all()  # a fainter pixel is outside the silhouette at any depth
