"""Volume rendering of the radiance field.

Rays -> samples in occupied space (recon.render.occupancy) -> field at the
samples -> nerfacc's compositing. nerfacc composites packed samples on a GPU where its kernels
built (recon.render.occupancy.use_nerfacc, probed once, never fatal);
its packed kernels have no CPU build, so on the CPU the same samples are laid
out as a padded [rays, max samples] batch for nerfacc's dense functions, which
are plain PyTorch. Padding has zero length, so it contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional

import nerfacc
import torch

from recon.camera import Cameras, generate_rays
from recon.config import RenderConfig
from recon.render.occupancy import evaluate_until_opaque, use_nerfacc


def step_size(radius: float, cfg: RenderConfig) -> float:
    """Marching step: ``n_samples_per_ray`` steps across the box's diagonal."""
    return 2.0 * math.sqrt(3.0) * radius / cfg.n_samples_per_ray


def composite(
    ray_indices: torch.Tensor,
    t_starts: torch.Tensor,
    t_ends: torch.Tensor,
    densities: torch.Tensor,
    values: Dict[str, torch.Tensor],
    n_rays: int,
) -> Dict[str, torch.Tensor]:
    """Weights from densities, then each value [S, C] accumulated per ray -> [n_rays, C]; plus opacity."""
    if use_nerfacc(densities.device):
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, densities, ray_indices=ray_indices, n_rays=n_rays)
        out = {name: nerfacc.accumulate_along_rays(weights, v, ray_indices=ray_indices, n_rays=n_rays) for name, v in values.items()}
        out["opacity"] = nerfacc.accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=n_rays)
        out["weights"] = weights
        return out

    counts = torch.bincount(ray_indices, minlength=n_rays)
    width = int(counts.max().item()) if ray_indices.numel() else 0
    position = torch.arange(ray_indices.numel(), device=ray_indices.device) - (torch.cumsum(counts, 0) - counts)[ray_indices]

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((n_rays, width) + x.shape[1:])
        out[ray_indices, position] = x
        return out

    weights_dense, _, _ = nerfacc.render_weight_from_density(padded(t_starts), padded(t_ends), padded(densities))
    out = {name: nerfacc.accumulate_along_rays(weights_dense, padded(v)) for name, v in values.items()}
    out["opacity"] = nerfacc.accumulate_along_rays(weights_dense, None)
    out["weights"] = weights_dense[ray_indices, position]
    return out


@dataclass
class RayBundle:
    rgb: torch.Tensor  # [R, 3] over the background
    opacity: torch.Tensor  # [R, 1]
    # [R, 1] sum over samples of weight x distance: the expected distance times
    # the opacity (0 where empty); divide by ``opacity`` for the expected distance
    accumulated_depth: torch.Tensor
    normal: Optional[torch.Tensor] = None  # [R, 3] accumulated world normals
    orientation: Optional[torch.Tensor] = None  # [R] penalty of normals facing away from the camera
    n_samples: int = 0
    surface_distance: Optional[torch.Tensor] = None  # [R, 1] where the ray's opacity reaches ``surface_opacity`` (inf: never); only when asked


def opacity_distance(
    weights: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, level: float = 0.5
) -> torch.Tensor:
    """Per ray, where accumulated opacity first reaches ``level``: the surface a viewer sees.

    On a soft field the expected depth lies behind that point (it averages
    over the fog the ray crosses), so carving or measuring geometry uses this.
    """
    from recon.render.occupancy import exclusive_sum_per_ray

    before = exclusive_sum_per_ray(weights, ray_indices, n_rays)
    after = before + weights
    crossing = (before < level) & (after >= level)
    # linear interpolation inside the sample interval where the crossing happens
    fraction = ((level - before) / weights.clamp(min=1e-10)).clamp(0.0, 1.0)
    t = torch.where(crossing, t_starts + fraction * (t_ends - t_starts), torch.full_like(t_starts, float("inf")))
    out = torch.full((n_rays,), float("inf"), device=t.device, dtype=t.dtype)
    return out.scatter_reduce(0, ray_indices, t, reduce="amin")[:, None]


def _field_at(field, origins, directions, ray_indices, t_starts, t_ends, with_features: bool, index: torch.Tensor):
    """(density, albedo[, features]) of the field at the midpoints of packed samples ``index``.

    Features (for :meth:`RadianceField.encode_again`) only when asked and the field has them.
    """
    rays = ray_indices[index]
    at = origins[rays] + directions[rays] * (0.5 * (t_starts[index] + t_ends[index]))[:, None]
    if with_features and hasattr(field, "encode"):
        features = field.encode(at)
        return (*field.decode(features, at), features)
    return field(at)


def render_rays(
    field,
    occupancy,
    origins: torch.Tensor,
    directions: torch.Tensor,
    cfg: RenderConfig,
    background: torch.Tensor,
    stratified: bool = False,
    normals: bool = False,
    generator: Optional[torch.Generator] = None,
    surface_opacity: Optional[float] = None,
) -> RayBundle:
    """Render rays [R, 3]; ``normals`` also accumulates normals and the orientation penalty.

    With ``surface_opacity``, ``surface_distance`` is where each ray's opacity
    first reaches it (for carving; the fit's renders skip the extra pass).
    """
    n_rays = origins.shape[0]
    step = step_size(field.radius, cfg)

    def midpoints_of(t_starts, t_ends, ray_indices):
        return origins[ray_indices] + directions[ray_indices] * (0.5 * (t_starts + t_ends))[:, None]

    if normals:
        # Two passes: densities without gradients decide where rays stop, then
        # densities, colours and normals (a gradient of the density) of the rest.
        def sigma_fn(t_starts, t_ends, ray_indices):
            return field.density(midpoints_of(t_starts, t_ends, ray_indices))

        ray_indices, t_starts, t_ends = occupancy.sample(origins, directions, step, stratified, sigma_fn=sigma_fn, generator=generator)
        density, albedo, normal = field.density_and_normal(midpoints_of(t_starts, t_ends, ray_indices), create_graph=torch.is_grad_enabled())
    else:
        # The field without gradients front to back until each ray is opaque (nerfacc's
        # early stop), and when training the same values again, with gradients.
        ray_indices, t_starts, t_ends = occupancy.sample(origins, directions, step, stratified, generator=generator)
        training = torch.is_grad_enabled()
        features = None
        if ray_indices.numel():
            evaluate = partial(_field_at, field, origins, directions, ray_indices, t_starts, t_ends, training)
            with torch.no_grad():
                index, density, albedo, *features = evaluate_until_opaque(evaluate, t_starts, t_ends, ray_indices, n_rays)
            ray_indices, t_starts, t_ends = ray_indices[index], t_starts[index], t_ends[index]
        else:
            density, albedo = field(midpoints_of(t_starts, t_ends, ray_indices))
        if training:
            midpoints = midpoints_of(t_starts, t_ends, ray_indices)
            if features:
                density, albedo = field.decode(field.encode_again(features[0], midpoints), midpoints)
            else:
                density, albedo = field(midpoints)
    values = {"rgb": albedo, "accumulated_depth": (0.5 * (t_starts + t_ends))[:, None]}
    if normals:
        values["normal"] = normal
    out = composite(ray_indices, t_starts, t_ends, density, values, n_rays)
    opacity = out["opacity"]
    bundle = RayBundle(
        rgb=out["rgb"] + (1.0 - opacity) * background,
        opacity=opacity,
        accumulated_depth=out["accumulated_depth"],
        n_samples=int(ray_indices.numel()),
    )
    if surface_opacity is not None:
        bundle.surface_distance = opacity_distance(out["weights"].detach(), t_starts, t_ends, ray_indices, n_rays, surface_opacity)
    if normals:
        bundle.normal = out["normal"]
        # Ref-NeRF's orientation loss: visible samples should not face away from the camera.
        facing_away = torch.relu((normal * directions[ray_indices]).sum(-1)) ** 2
        bundle.orientation = torch.zeros(n_rays, device=origins.device).index_add(0, ray_indices, out["weights"].detach() * facing_away)
    return bundle


@dataclass
class ImageBatch:
    rgb: torch.Tensor  # [N, H, W, 3]
    opacity: torch.Tensor  # [N, H, W, 1]
    accumulated_depth: torch.Tensor  # [N, H, W, 1], see RayBundle
    normal: Optional[torch.Tensor] = None  # [N, H, W, 3]
    orientation: Optional[torch.Tensor] = None  # [N, H, W]
    n_samples: int = 0
    surface_distance: Optional[torch.Tensor] = None  # [N, H, W, 1]


def render_images(
    field,
    occupancy,
    cameras: Cameras,
    resolution: int,
    cfg: RenderConfig,
    stratified: bool = False,
    normals: bool = False,
    generator: Optional[torch.Generator] = None,
    surface_opacity: Optional[float] = None,
) -> ImageBatch:
    """Render whole views [N, resolution, resolution] from ``cameras`` (see :func:`render_ray_images`)."""
    origins, directions = generate_rays(cameras, resolution)
    return render_ray_images(field, occupancy, origins, directions, cfg, stratified, normals, generator, surface_opacity)


def render_ray_images(
    field,
    occupancy,
    origins: torch.Tensor,
    directions: torch.Tensor,
    cfg: RenderConfig,
    stratified: bool = False,
    normals: bool = False,
    generator: Optional[torch.Generator] = None,
    surface_opacity: Optional[float] = None,
) -> ImageBatch:
    """Render images of rays ``origins``, ``directions`` [N, H, W, 3]; with gradients in one pass, without in chunks of ``cfg.chunk_rays``."""
    shape = origins.shape[:3]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    background = torch.as_tensor(cfg.background, dtype=torch.float32, device=origins.device)
    chunk = origins.shape[0] if torch.is_grad_enabled() else cfg.chunk_rays
    parts = [
        render_rays(field, occupancy, o, d, cfg, background, stratified, normals, generator, surface_opacity)
        for o, d in zip(origins.split(chunk), directions.split(chunk))
    ]

    def gather(name):
        if getattr(parts[0], name) is None:
            return None
        joined = torch.cat([getattr(p, name) for p in parts])
        return joined.reshape(*shape, *joined.shape[1:])

    return ImageBatch(
        rgb=gather("rgb"),
        opacity=gather("opacity"),
        accumulated_depth=gather("accumulated_depth"),
        normal=gather("normal"),
        orientation=gather("orientation"),
        n_samples=sum(p.n_samples for p in parts),
        surface_distance=gather("surface_distance"),
    )
