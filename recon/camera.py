"""Cameras: pose math, rays, projection and view sampling.

Conventions (docs/design.md, "Cameras"; they must not drift):

* World: right-handed, +z up, object centred at the origin.
* A camera at (elevation E, azimuth A, distance d), degrees, sits at
  ``d * (cos E cos A, cos E sin A, sin E)`` and looks at the origin with up = +z.
  Azimuth 0 is the input view; azimuth +90 sees the object's right side
  (the side that is on the image's right in the input view, world +y).
* Camera frame is OpenGL's: x right, y up, the camera looks along -z.
  ``c2w`` maps camera coordinates to world coordinates.
* Pixel (column u, row v) has its centre at (u + 0.5, v + 0.5); rows go down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


def camera_position(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """World position [..., 3] of cameras given in degrees."""
    e = torch.deg2rad(elevation)
    a = torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a), distance * torch.sin(e)],
        dim=-1,
    )


def look_at(position: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices [..., 4, 4] for cameras at ``position`` looking at the origin, up = +z."""
    forward = torch.nn.functional.normalize(-position, dim=-1)
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, world_up, dim=-1)
    # Straight above or below the object the up vector is undefined; pick world +y
    # as "up" in the image there so that the frame stays well defined.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand_as(forward), dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, fallback, right), dim=-1)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(*position.shape[:-1], 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = position
    c2w[..., 3, 3] = 1.0
    return c2w


@dataclass
class Cameras:
    """A batch of N orbit cameras looking at the origin (all angles in degrees)."""

    elevation: torch.Tensor  # [N]
    azimuth: torch.Tensor  # [N]
    distance: torch.Tensor  # [N]
    fovy: torch.Tensor  # [N]

    @staticmethod
    def make(elevation, azimuth, distance, fovy, device=None) -> "Cameras":
        """Broadcast scalars / sequences / tensors to N cameras."""
        values = [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1) for v in (elevation, azimuth, distance, fovy)]
        n = max(v.numel() for v in values)
        values = [v.expand(n).clone() if v.numel() == 1 else v for v in values]
        if any(v.numel() != n for v in values):
            raise ValueError("camera parameters must have one value or the same number of values")
        return Cameras(*values)

    def __len__(self) -> int:
        return self.elevation.shape[0]

    def __getitem__(self, index) -> "Cameras":
        pick = lambda v: v[index].reshape(-1)  # noqa: E731 - keeps indexing in one place
        return Cameras(pick(self.elevation), pick(self.azimuth), pick(self.distance), pick(self.fovy))

    def to(self, device) -> "Cameras":
        return Cameras(self.elevation.to(device), self.azimuth.to(device), self.distance.to(device), self.fovy.to(device))

    @property
    def device(self) -> torch.device:
        return self.elevation.device

    @property
    def position(self) -> torch.Tensor:
        return camera_position(self.elevation, self.azimuth, self.distance)

    @property
    def c2w(self) -> torch.Tensor:
        return look_at(self.position)

    def focal(self, height: int) -> torch.Tensor:
        """Focal length in pixels for an image ``height`` pixels tall, [N]."""
        return 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fovy))


def generate_rays(cameras: Cameras, height: int, width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions, each [N, H, W, 3], through pixel centres."""
    width = width or height
    device = cameras.device
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    focal = cameras.focal(height)[:, None, None]
    x = (u - 0.5 * width) / focal
    y = -(v - 0.5 * height) / focal
    directions_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [N, H, W, 3]
    c2w = cameras.c2w
    directions = torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], directions_cam)
    directions = torch.nn.functional.normalize(directions, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def project(points: torch.Tensor, cameras: Cameras, height: int, width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Project world points [N, P, 3] (or [P, 3], shared) into each camera.

    Returns pixel coordinates [N, P, 2] (x = column, y = row, continuous, pixel
    centres at +0.5) and depth [N, P] (distance along the viewing axis, > 0 in front).
    """
    width = width or height
    if points.dim() == 2:
        points = points.unsqueeze(0).expand(len(cameras), -1, -1)
    c2w = cameras.c2w
    rotation = c2w[:, :3, :3]
    local = torch.einsum("nji,npj->npi", rotation, points - c2w[:, None, :3, 3])  # R^T (p - t)
    depth = -local[..., 2]
    focal = cameras.focal(height)[:, None]
    safe_depth = torch.where(depth.abs() < 1e-8, torch.full_like(depth, 1e-8), depth)
    x = focal * local[..., 0] / safe_depth + 0.5 * width
    y = -focal * local[..., 1] / safe_depth + 0.5 * height
    return torch.stack([x, y], dim=-1), depth


def orbit_cameras(n_views: int, elevation: float, distance: float, fovy: float, device=None, start_azimuth: float = 0.0) -> Cameras:
    """``n_views`` cameras evenly spaced in azimuth at one elevation (evaluation, turntables)."""
    azimuth = start_azimuth + torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views)
    return Cameras.make(elevation, azimuth, distance, fovy, device=device)


def random_cameras(
    n_views: int,
    elevation_range: Sequence[float],
    distance: float,
    fovy: float,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Cameras:
    """Random views for SDS: elevation uniform on the sphere's band, full azimuth, fixed distance and fovy.

    Elevation is drawn so that views are uniform in area on the band between the
    two elevations (not uniform in angle, which would crowd the poles).
    """
    low, high = (math.radians(e) for e in elevation_range)
    u = torch.rand(n_views, generator=generator)
    elevation = torch.rad2deg(torch.asin(math.sin(low) + u * (math.sin(high) - math.sin(low))))
    azimuth = torch.rand(n_views, generator=generator) * 360.0 - 180.0
    return Cameras.make(elevation, azimuth, distance, fovy, device=device)


def schedule_stage(step: int, milestones: Sequence[int]) -> int:
    """Index of the coarse-to-fine stage that ``step`` belongs to."""
    stage = 0
    for index, start in enumerate(milestones):
        if step >= start:
            stage = index
    return stage
