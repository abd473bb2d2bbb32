"""Refine the baked texture against the supervision the field had (docs/design.md, "Refinement").

The bake reads each texel's colour from the field along the surface normal. A
surface extracted from a soft field, and a colour read along its normal, do
not reproduce what volume rendering showed at silhouettes and sharp colour
edges, so the asset trails its own field. Refinement stops copying and
optimises the texture itself through the mesh rasteriser, against what the
field was fitted to: the reference view (RGB) and the prior's SDS on random
views, with the same prior protocol (``prior.sds_loss(images, cameras, step)``).

Only the texture changes, so where each pixel reads the texture is fixed:
every view is rasterised once (:func:`texel_views`) and each step is a texture
lookup and a composite (:func:`render_texture`), cheap enough for the CPU.

With ``refine.vertex_offsets``, a first phase (:func:`fit_vertex_offsets`) moves
each vertex along its normal by a bounded offset, kept smooth by a Laplacian
term (:func:`uniform_laplacian`), against the same supervision plus the
reference view's coverage. Its views are rasterised again every step, with
antialiased silhouettes (``render_mesh(..., antialias=True)``) so that the
outline has a gradient; the texture phase then runs as above on the moved mesh.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F

from recon.camera import Cameras, project, random_cameras
from recon.config import CameraConfig, RefineConfig
from recon.mesh.data import MeshData
from recon.mesh.texture import vertex_normals
from recon.render.mesh_raster import rasterize, render_mesh, sample_texture


@dataclass
class TexelViews:
    """Where the samples of N views read the texture; fixed while the geometry is.

    Each view is sampled ``ssaa`` x ``ssaa`` times a pixel, as the evaluation's
    antialiased renders are; a covered sample adds its texel colour / ssaa^2
    to its pixel, the uncovered share of a pixel shows the background.
    """

    pixel: torch.Tensor  # [P] flat index into [N * resolution^2] of each covered sample's pixel (sorted by view)
    uv: torch.Tensor  # [P, 2] texture coordinates of those samples
    starts: torch.Tensor  # [N + 1] view v's samples are pixel[starts[v]:starts[v + 1]]
    coverage: torch.Tensor  # [N, resolution, resolution, 1] share of each pixel the mesh covers
    resolution: int
    ssaa: int


def texel_views(mesh: MeshData, cameras: Cameras, resolution: int, ssaa: int = 2) -> TexelViews:
    """Rasterise ``mesh`` (with UVs) in ``cameras`` once: the texture coordinate behind each covered sample."""
    if mesh.uvs is None or mesh.face_uvs is None:
        raise ValueError("texel_views needs a UV-unwrapped mesh")
    size = resolution * ssaa
    with torch.no_grad():
        pixel_xy, depth = project(mesh.vertices.float(), cameras.to(mesh.device), size)
        fragments = rasterize(pixel_xy, depth, mesh.faces.long(), size)
        face_id = fragments.face_id.reshape(-1)
        sample = (face_id >= 0).nonzero().squeeze(1)  # sorted: view-major, then row, then column
        bary = fragments.bary.reshape(-1, 3)[sample]
        uv = (mesh.uvs.float()[mesh.face_uvs.long()[face_id[sample]]] * bary[:, :, None]).sum(dim=1)
        view = torch.div(sample, size * size, rounding_mode="floor")
        row = torch.div(sample % (size * size), size, rounding_mode="floor")
        column = sample % size
        pixel = (view * resolution + torch.div(row, ssaa, rounding_mode="floor")) * resolution + torch.div(column, ssaa, rounding_mode="floor")
        starts = torch.zeros(len(cameras) + 1, dtype=torch.long, device=sample.device)
        starts[1:] = torch.bincount(view, minlength=len(cameras)).cumsum(0)
        alpha = (fragments.face_id >= 0).float()[..., None]
        coverage = F.avg_pool2d(alpha.permute(0, 3, 1, 2), ssaa).permute(0, 2, 3, 1)
    return TexelViews(pixel, uv, starts, coverage, resolution, ssaa)


def render_texture(views: TexelViews, texture: torch.Tensor, background: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Renders [n, resolution, resolution, 3] of the views ``index`` (all by default) with ``texture`` [T, T, 3].

    Differentiable with respect to ``texture``: each covered sample is a
    bilinear texture lookup, added to its pixel with weight 1 / ssaa^2, over
    ``background`` [3] where the mesh leaves the pixel uncovered.
    """
    per_view = views.resolution**2
    n_views = len(views.starts) - 1
    chosen = list(range(n_views)) if index is None else [int(v) for v in index]
    parts = [(slot, views.starts[v], views.starts[v + 1]) for slot, v in enumerate(chosen)]
    pixel = torch.cat([views.pixel[a:b] - (chosen[slot] - slot) * per_view for slot, a, b in parts])
    uv = torch.cat([views.uv[a:b] for _, a, b in parts])
    colour = sample_texture(texture, uv, wrap="clamp").clamp(0.0, 1.0)
    uncovered = 1.0 - views.coverage[chosen].reshape(-1, 1)
    image = (background.to(texture.dtype) * uncovered).index_add(0, pixel, colour / views.ssaa**2)
    return image.view(len(chosen), views.resolution, views.resolution, 3)


@contextmanager
def truth_sampling(prior, ssaa: int) -> Iterator[None]:
    """Within the block, a prior that renders a known truth (``prior.ssaa``: the reference prior) averages it over ssaa x ssaa samples a pixel.

    The prior is shared with the fit, whose point-sampled field renders keep one
    sample a pixel, so the setting is put back afterwards. Priors without a
    rendered truth (Zero123) are left as they are.
    """
    previous = getattr(prior, "ssaa", None)
    if previous is None:
        yield
        return
    prior.ssaa = ssaa
    try:
        yield
    finally:
        prior.ssaa = previous


def uniform_laplacian(values: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Each vertex's value less the mean of its edge neighbours': values [V, C], faces [F, 3] -> [V, C].

    Applied to displacements it measures how unevenly neighbours move: zero for an unmoved mesh
    and for a rigid shift, whatever the mesh's own curvature (a Laplacian of the positions
    would also pull a curved surface inwards).
    """
    faces = faces.long()
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = torch.unique(torch.sort(edges, dim=1).values, dim=0)  # each undirected edge once
    source = torch.cat([edges[:, 0], edges[:, 1]])
    target = torch.cat([edges[:, 1], edges[:, 0]])
    total = torch.zeros_like(values).index_add(0, source, values[target])
    degree = torch.bincount(source, minlength=values.shape[0]).clamp(min=1).to(values.dtype)
    return values - total / degree[:, None]


def fit_vertex_offsets(
    mesh: MeshData,
    prior,
    reference_rgb: torch.Tensor,
    reference_alpha: Optional[torch.Tensor],
    reference_cameras: Cameras,
    random_views: Cameras,
    cfg: RefineConfig,
    prior_step: int,
    background=(1.0, 1.0, 1.0),
    seed: int = 0,
    progress=None,
) -> tuple:
    """Move each vertex of a textured ``mesh`` along its normal; returns (moved mesh, stats).

    ``cfg.vertex_steps`` Adam steps (learning rate ``cfg.lr_vertices``) on one
    offset a vertex, clamped to +-``cfg.max_offset``, minimising
    ``lambda_rgb * MSE(reference rgb) + lambda_mask * MSE(reference coverage)
    + lambda_sds * SDS + lambda_smooth * mean |Laplacian(displacement)|^2``
    with the texture fixed. ``reference_rgb`` [1, R, R, 3] and
    ``reference_alpha`` [1, R, R, 1] (optional) are at ``cfg.resolution``.

    Views are rendered at one sample a pixel: the antialiased silhouette
    already gives each edge pixel its covered share, and re-rasterising at the
    texture phase's supersampling every step would cost it several times over.
    """
    device = mesh.vertices.device
    generator = torch.Generator().manual_seed(seed + 1)  # the texture phase keeps its own draws
    base = mesh.vertices.detach().float()
    normals = vertex_normals(mesh).to(device)
    offsets = torch.zeros(base.shape[0], 1, device=device, requires_grad=True)  # [V, 1] along the normal
    optimizer = torch.optim.Adam([offsets], lr=cfg.lr_vertices, betas=(0.9, 0.99))
    weights = {"rgb": cfg.lambda_rgb, "mask": cfg.lambda_mask, "sds": cfg.lambda_sds, "smooth": cfg.lambda_smooth}
    target = reference_rgb.to(device=device, dtype=torch.float32)

    def render(cameras: Cameras) -> dict:
        moved = replace(mesh, vertices=base + offsets * normals)
        return render_mesh(moved, cameras, cfg.resolution, background=background, uv_wrap="clamp", antialias=True)

    first: Dict[str, float] = {}
    stats: Dict[str, float] = {}
    for step in range(cfg.vertex_steps):
        reference = render(reference_cameras)
        losses = {"rgb": F.mse_loss(reference["rgb"], target)}
        if reference_alpha is not None:
            losses["mask"] = F.mse_loss(reference["alpha"], reference_alpha.to(device=device, dtype=torch.float32))
        if cfg.lambda_sds > 0:
            index = torch.randperm(len(random_views), generator=generator)[: cfg.batch_size].to(device)
            losses["sds"] = prior.sds_loss(render(random_views[index])["rgb"], random_views[index], prior_step)["loss_sds"]
        losses["smooth"] = uniform_laplacian(offsets * normals, mesh.faces).square().sum(dim=1).mean()
        total = sum(weights[name] * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        with torch.no_grad():
            offsets.clamp_(-cfg.max_offset, cfg.max_offset)
        stats = {f"refine_vertex_{name}_loss": float(value.detach()) for name, value in losses.items()}
        first = first or {key.replace("_loss", "_loss_first"): value for key, value in stats.items()}
        if progress is not None:
            progress.update(1, loss=float(total.detach()))
    moved = offsets.detach().abs()
    stats.update(refine_offset_max=float(moved.max()) if moved.numel() else 0.0, refine_offset_mean=float(moved.mean()) if moved.numel() else 0.0)
    return replace(mesh, vertices=(base + offsets.detach() * normals).to(mesh.vertices.dtype)), {**first, **stats}


def refine_texture(
    mesh: MeshData,
    prior,
    reference_rgb: torch.Tensor,
    reference_cameras: Cameras,
    cfg: RefineConfig,
    camera_cfg: CameraConfig,
    prior_step: int,
    background=(1.0, 1.0, 1.0),
    seed: int = 0,
    progress=None,
    reference_alpha: Optional[torch.Tensor] = None,
) -> tuple:
    """Optimise the texture of a UV-mapped ``mesh``; returns (refined mesh, stats).

    With ``cfg.vertex_offsets``, :func:`fit_vertex_offsets` first moves the
    vertices (against ``reference_alpha`` [1, R, R, 1] too, when given).

    ``reference_rgb`` [1, R, R, 3] is the input view over the background at
    ``cfg.resolution``, seen by ``reference_cameras`` (one camera, the fit's
    frame). Each step renders the reference view and ``cfg.batch_size`` of
    ``cfg.n_views`` random views (drawn once, from the fit's camera band) and
    takes an Adam step on ``lambda_rgb * MSE(reference) + lambda_sds * SDS``.
    ``prior_step`` is the fit step whose timestep range the SDS uses (the end
    of the annealing: fine detail, as at the end of the fit).
    """
    device = mesh.vertices.device
    generator = torch.Generator().manual_seed(seed)
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    random_views = random_cameras(cfg.n_views, camera_cfg.elevation_range, camera_cfg.distance, camera_cfg.fovy, generator, device)
    # The views compared with the truth average supersampling^2 samples a pixel (the vertex phase's
    # antialiased outlines approximate the same area average).
    with truth_sampling(prior, cfg.supersampling if cfg.antialiased_truth else 1):
        offset_stats: Dict[str, float] = {}
        if cfg.vertex_offsets and cfg.vertex_steps > 0:
            mesh, offset_stats = fit_vertex_offsets(
                mesh, prior, reference_rgb, reference_alpha, reference_cameras, random_views, cfg, prior_step, background, seed, progress
            )
        reference = texel_views(mesh, reference_cameras, cfg.resolution, cfg.supersampling)
        others = texel_views(mesh, random_views, cfg.resolution, cfg.supersampling)
        target = reference_rgb.to(device=device, dtype=torch.float32)

        texture = mesh.texture.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([texture], lr=cfg.lr, betas=(0.9, 0.99))
        first: Dict[str, float] = {}
        stats: Dict[str, float] = {}
        for step in range(cfg.steps):
            losses = {"rgb": F.mse_loss(render_texture(reference, texture, bg), target)}
            if cfg.lambda_sds > 0:
                index = torch.randperm(cfg.n_views, generator=generator)[: cfg.batch_size]
                images = render_texture(others, texture, bg, index)
                losses["sds"] = prior.sds_loss(images, random_views[index.to(device)], prior_step)["loss_sds"]
            total = cfg.lambda_rgb * losses["rgb"] + cfg.lambda_sds * losses.get("sds", 0.0)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                texture.clamp_(0.0, 1.0)
            stats = {f"refine_{name}_loss": float(value.detach()) for name, value in losses.items()}
            first = first or {key.replace("_loss", "_loss_first"): value for key, value in stats.items()}
            if progress is not None:  # recon.progress.Progress
                progress.update(1, loss=float(total.detach()))
    refined = replace(mesh, texture=texture.detach().to(mesh.texture.dtype))
    return refined, {**offset_stats, **first, **stats, "refine_steps": cfg.steps}
