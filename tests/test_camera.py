import math

import pytest
import torch

from recon.camera import Cameras, camera_position, generate_rays, orbit_cameras, project, random_cameras, schedule_stage


def test_position_follows_design_formula():
    p = camera_position(torch.tensor(30.0), torch.tensor(60.0), torch.tensor(2.0))
    e, a = math.radians(30), math.radians(60)
    expected = torch.tensor([2 * math.cos(e) * math.cos(a), 2 * math.cos(e) * math.sin(a), 2 * math.sin(e)])
    assert torch.allclose(p, expected, atol=1e-6)


def test_input_view_frame_and_right_side():
    cam = Cameras.make(0.0, 0.0, 2.0, 40.0)
    c2w = cam.c2w[0]
    assert torch.allclose(c2w[:3, 3], torch.tensor([2.0, 0.0, 0.0]))
    assert torch.allclose(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # looks along -x
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)  # up = +z
    # world +y is on the image's right in the input view, and azimuth +90 looks at it
    xy, depth = project(torch.tensor([[0.0, 0.3, 0.0]]), cam, 64)
    assert xy[0, 0, 0] > 32 and abs(xy[0, 0, 1] - 32) < 1e-4 and depth[0, 0] > 0
    side = Cameras.make(0.0, 90.0, 2.0, 40.0)
    assert torch.allclose(side.position[0], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)


def test_rays_and_projection_agree():
    cams = Cameras.make([0.0, 35.0, -20.0], [0.0, 120.0, 250.0], 2.0, 40.0)
    origins, directions = generate_rays(cams, 8, 12)
    points = origins + 1.7 * directions
    xy, depth = project(points.reshape(3, -1, 3), cams, 8, 12)
    v, u = torch.meshgrid(torch.arange(8) + 0.5, torch.arange(12) + 0.5, indexing="ij")
    assert torch.allclose(xy.reshape(3, 8, 12, 2)[..., 0], u.expand(3, -1, -1), atol=1e-3)
    assert torch.allclose(xy.reshape(3, 8, 12, 2)[..., 1], v.expand(3, -1, -1), atol=1e-3)
    assert (depth > 0).all()


def test_straight_above_is_well_defined():
    c2w = Cameras.make(90.0, 0.0, 2.0, 40.0).c2w[0]
    assert torch.isfinite(c2w).all()
    assert torch.allclose(c2w[:3, :3] @ c2w[:3, :3].T, torch.eye(3), atol=1e-5)


def test_random_and_orbit_views():
    g = torch.Generator().manual_seed(0)
    cams = random_cameras(2000, [-10.0, 60.0], 2.0, 40.0, g)
    assert cams.elevation.min() >= -10.0 - 1e-4 and cams.elevation.max() <= 60.0 + 1e-4
    assert cams.azimuth.min() >= -180 and cams.azimuth.max() < 180
    # uniform on the sphere's band: more views near the equator than near 60 degrees
    assert (cams.elevation < 10).sum() > (cams.elevation > 40).sum()
    orbit = orbit_cameras(16, 30.0, 1.5, 49.1)
    assert len(orbit) == 16 and torch.allclose(orbit.azimuth[1] - orbit.azimuth[0], torch.tensor(22.5))


@pytest.mark.parametrize("step,stage", [(0, 0), (599, 0), (600, 1), (5000, 2)])
def test_schedule_stage(step, stage):
    assert schedule_stage(step, [0, 600, 1200]) == stage
