"""What a fitted field shows, for the stages after the fit: carving views, surface colour, evaluation views.

Each function takes the field and its occupancy grid (no fit state) and
renders without gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from recon.camera import Cameras, generate_rays, orbit_cameras
from recon.config import RenderConfig
from recon.frames import Similarity
from recon.render.volume import render_images, render_ray_images

CARVING_RINGS = 4  # rings of views spanning the trained elevations
CARVING_VIEWS_PER_RING = 8


@torch.no_grad()
def carving_views(
    field, occupancy, elevation_range: Sequence[float], distance: float, fovy: float, resolution: int, cfg: RenderConfig, surface_opacity: float
):
    """Cameras [32] around the object and what the field shows from them: (cameras, surface distance [32, H, W], opacity [32, H, W]).

    The surface distance is where a ray's opacity first reaches
    ``surface_opacity`` (inf where it never does). Only elevations the fit
    trained on (``elevation_range``): outside them the field was never
    supervised, and its fog would carve real surface away.
    """
    low, high = elevation_range
    rings = [
        orbit_cameras(CARVING_VIEWS_PER_RING, low + (high - low) * i / (CARVING_RINGS - 1), distance, fovy, device=_device(field), start_azimuth=22.5 * (i % 2))
        for i in range(CARVING_RINGS)
    ]
    cameras = Cameras(*(torch.cat([getattr(ring, name) for ring in rings]) for name in ("elevation", "azimuth", "distance", "fovy")))
    out = render_images(field, occupancy, cameras, resolution, cfg, surface_opacity=surface_opacity)
    return cameras, out.surface_distance[..., 0], out.opacity[..., 0]


@torch.no_grad()
def surface_colour(field, points: torch.Tensor, normals: torch.Tensor, depth: float, n_samples: int = 16) -> torch.Tensor:
    """The colour [P, 3] the field shows at mesh points [P, 3] with outward normals [P, 3].

    The mesh's surface is a level set of a soft field, so it can sit a little
    in front of or behind where the field's renders take their colour; reading
    the albedo exactly at the mesh point picks up the unconstrained fog there.
    A ray from ``depth`` outside the surface to ``depth`` inside, composited as
    the renderer does, gives the colour a camera facing the surface would see.
    """
    device = _device(field)
    points, normals = points.to(device), normals.to(device)
    offsets = torch.linspace(depth, -depth, n_samples, device=device)
    samples = points[:, None, :] + normals[:, None, :] * offsets[None, :, None]
    density, albedo = field(samples.reshape(-1, 3))
    density, albedo = density.reshape(-1, n_samples), albedo.reshape(-1, n_samples, 3)
    alpha = 1.0 - torch.exp(-density * (2.0 * depth / (n_samples - 1)))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    weights = alpha * transmittance
    total = weights.sum(dim=1, keepdim=True)
    composited = (weights[..., None] * albedo).sum(dim=1) / total.clamp(min=1e-6)
    # where the short ray saw nothing (the mesh strayed from the field), fall back to the point itself
    at_point = albedo[:, n_samples // 2]
    return torch.where(total > 1e-3, composited, at_point).float()


@torch.no_grad()
def field_views(field, occupancy, cameras: Cameras, resolution: int, cfg: RenderConfig, fit_from_world: Optional[Similarity] = None) -> torch.Tensor:
    """The field's colour [N, H, W, 3] seen by ``cameras``, which may live in another frame.

    ``fit_from_world`` maps that frame into the fit's (the inverse of
    :func:`recon.frames.fit_to_photo_world`); the rays are mapped, the field stays.
    """
    origins, directions = generate_rays(cameras.to(_device(field)), resolution)
    if fit_from_world is not None:
        origins, directions = fit_from_world.apply_to_rays(origins, directions)
    return render_ray_images(field, occupancy, origins, directions, cfg).rgb.clamp(0, 1)


def _device(field) -> torch.device:
    return next(field.parameters()).device
