"""Fitted field -> clean triangle mesh: a solid sampled on a grid, then marching cubes.

Two ways to get the solid, one way to mesh it (docs/design.md, "Extraction"):

* :func:`solid_from_views` (``extract.method=carve``, the default): space
  carving from depth and opacity renders of the field. A field fitted by SDS
  is soft and leaky inside, so no density level is the surface its renders
  show; the carved solid is exactly the shape the renders agree on.
* :func:`solid_from_density` (``extract.method=density``): the region where the
  density exceeds ``extract.threshold`` (or the automatic level of
  :func:`auto_threshold`).
* :func:`mesh_from_solid`: enclosed voids filled, marching cubes, cleaning,
  small components dropped, decimation to ``extract.max_faces``, outward
  winding.

Either strategy samples twice: a coarse grid over the whole box [-r, r]^3
finds where the object is, then a fine grid of ``extract.resolution`` samples
along the longest side covers just that region, so the resolution is spent on
the object. The fine grid is padded with one layer of empty samples, so the
surface closes where the object touches the box.

Carving values. Each sample gets, per view that sees it, the smaller of an
opacity term and a depth term, then the minimum over the views; the surface
is at 0.5. Both terms read the soft field below half opacity, because a view
can only remove material: a view whose depth lies behind the true surface
would shave it off although every other view agrees on it.

* Depth: where the ray's opacity first reaches ``CARVE_DEPTH_OPACITY``. On a
  crisp surface that is the surface; a grazing ray through a soft fringe gets
  there before it gets to one half, so smooth silhouettes keep their edge.
* Silhouette: a pixel is solid from ``CARVE_SILHOUETTE_OPACITY`` on, so the
  fringe of a soft silhouette stays inside.

The values are continuous (bilinear in the views' pixels, a ramp in depth),
so marching cubes puts vertices between samples and needs no blur.

Automatic density level (``auto_threshold``). A NeRF density is an opacity per
unit length: a step of length ``s`` through density ``sigma`` has alpha
``1 - exp(-sigma s)``. The level is where a thin shell becomes half opaque,
with the length scale clamped to what the grid resolves: at most
``ln 2 / voxel`` (one voxel of it is already half opaque), otherwise half the
peak (the natural extent of a soft blob), and never below ``ln 2 / box_size``
(a density that is not half opaque across the whole box renders as nothing;
a field whose peak is below it is reported empty).

Orientation: pymcubes emits triangles counter-clockwise seen from the side of
lower values when the inside holds the higher values, so normals point out.
Marching cubes on a closed (padded) grid is consistently wound, so winding is
only re-checked after decimation, which may flip a few faces.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import fast_simplification
import mcubes
import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.sparse.csgraph
import torch
import trimesh

from recon.camera import Cameras
from recon.config import ExtractConfig
from recon.errors import ReconError
from recon.mesh.data import MeshData

log = logging.getLogger(__name__)

DensityFn = Callable[[torch.Tensor], torch.Tensor]

COARSE_RESOLUTION = 64  # samples a side of the first pass over the whole box
COARSE_PADDING = 2  # coarse cells added around the occupied region
CARVED_LEVEL = 0.5  # the surface of the carving values
CARVE_RAMP = 2.0  # voxels over which the depth test goes from empty to solid
CARVE_DEPTH_OPACITY = 0.25  # a view's surface is where its rays reach this opacity
CARVE_SILHOUETTE_OPACITY = 0.2  # pixels at least this opaque are inside the silhouette


@dataclass
class DepthViews:
    """What the field's renders show from a set of cameras: where each ray ends and how opaque it is."""

    cameras: Cameras
    distance: torch.Tensor  # [N, H, W] distance along each ray to where it reaches CARVE_DEPTH_OPACITY (inf: never)
    opacity: torch.Tensor  # [N, H, W]


@dataclass
class SampledSolid:
    """A solid sampled on a regular grid: ``values`` above ``level`` are inside."""

    values: np.ndarray  # [X, Y, Z] float32
    level: float
    low: np.ndarray  # [3] world position of sample (0, 0, 0)
    voxel: float  # spacing of the samples


def extract_mesh(density_fn: DensityFn, radius: float, cfg: ExtractConfig, views: DepthViews = None, chunk: int = 262144, device=None) -> MeshData:
    """The field's mesh: carved from ``views`` (``cfg.method == "carve"``) or cut at a density level.

    ``density_fn`` maps world points [P, 3] to densities [P] (for the density
    strategy); ``radius`` is the half side of the field's box.
    """
    if cfg.method == "carve":
        if views is None:
            raise ValueError("extract.method=carve needs the field's depth views")
        solid = solid_from_views(views, radius, cfg)
    else:
        solid = solid_from_density(density_fn, radius, cfg, chunk, device)
    return mesh_from_solid(solid, cfg)


def solid_from_views(views: DepthViews, radius: float, cfg: ExtractConfig) -> SampledSolid:
    """Carving values (see the module notes) on a fine grid over the region the views leave solid."""
    coarse_cell = 2.0 * radius / COARSE_RESOLUTION
    coarse_low = np.full(3, -radius + 0.5 * coarse_cell)
    coarse = carve_values(_grid_points(coarse_low, coarse_cell, (COARSE_RESOLUTION,) * 3), views, margin=cfg.carve_margin * coarse_cell, ramp=CARVE_RAMP * coarse_cell)
    low, high = _occupied_box(coarse.reshape((COARSE_RESOLUTION,) * 3).cpu().numpy(), CARVED_LEVEL, coarse_low, coarse_cell, radius)
    voxel, shape = _fine_grid(low, high, cfg.resolution)
    values = carve_values(_grid_points(low, voxel, shape), views, margin=cfg.carve_margin * voxel, ramp=CARVE_RAMP * voxel)
    log.info("extract: carved from %d views, grid %s, voxel %.4g", len(views.cameras), shape, voxel)
    return SampledSolid(values.reshape(shape).cpu().numpy().astype(np.float32), CARVED_LEVEL, low, voxel)


def solid_from_density(density_fn: DensityFn, radius: float, cfg: ExtractConfig, chunk: int = 262144, device=None) -> SampledSolid:
    """The field's density on a fine grid over the region above the level (``cfg.threshold``, else automatic).

    With ``cfg.smoothing`` > 0 the solid is the inside/outside grid blurred by
    that many voxels and cut at one half: a field fitted by SDS is noisy at the
    voxel scale, and its raw level set comes out rough.
    """
    device = device if device is not None else _device_of(density_fn)
    box_size = 2.0 * radius
    coarse_cell = box_size / COARSE_RESOLUTION
    coarse_low = np.full(3, -radius + 0.5 * coarse_cell)
    coarse = sample_grid(density_fn, coarse_low, coarse_cell, (COARSE_RESOLUTION,) * 3, chunk, device)
    # The coarse level can only be lower than the fine one (a bigger voxel, a peak
    # sampled no higher), so the box it finds contains the fine surface.
    coarse_level = cfg.threshold if cfg.threshold is not None else auto_threshold(coarse, coarse_cell, box_size)
    low, high = _occupied_box(coarse, coarse_level, coarse_low, coarse_cell, radius)
    voxel, shape = _fine_grid(low, high, cfg.resolution)
    fine = sample_grid(density_fn, low, voxel, shape, chunk, device)
    level = cfg.threshold if cfg.threshold is not None else auto_threshold(fine, voxel, box_size)
    log.info("extract: iso-level %.4g (peak density %.4g), grid %s, voxel %.4g", level, fine.max(), shape, voxel)
    if not (fine > level).any():
        raise _empty(level, fine, radius)
    if cfg.smoothing > 0:
        inside = (fill_enclosed(fine, level) > level).astype(np.float32)
        fine = scipy.ndimage.gaussian_filter(inside, sigma=cfg.smoothing)
        level = 0.5
    return SampledSolid(fine, level, low, voxel)


def mesh_from_solid(solid: SampledSolid, cfg: ExtractConfig) -> MeshData:
    """Marching cubes of a sampled solid, cleaned, filtered, decimated and wound outwards."""
    values, level, low, voxel = solid.values, solid.level, solid.low, solid.voxel
    if not (values > level).any():
        raise _empty(level, values, float(np.abs(low).max()))
    values = fill_enclosed(values, level)
    # One layer of empty samples around the grid closes the surface at the box.
    outside = 0.0 if level > 0 else level - 1.0
    vertices, faces = mcubes.marching_cubes(np.pad(values, 1, mode="constant", constant_values=outside), level)
    vertices = (vertices - 1.0) * voxel + low  # grid index -> world
    # Where the object touches the sampled box, the closing cap would sit half
    # a voxel outside it, in a region the field never saw: put it on the box.
    vertices = np.clip(vertices, low, low + (np.array(values.shape) - 1) * voxel)

    mesh = _clean(trimesh.Trimesh(vertices, faces.astype(np.int64), process=False))
    mesh = _drop_small_components(mesh, cfg.min_component_ratio)
    if cfg.max_faces is not None and len(mesh.faces) > cfg.max_faces:
        mesh = _decimate(mesh, cfg.max_faces)
    _orient_outward(mesh)
    return MeshData(
        vertices=torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32),
        faces=torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64),
    )


def auto_threshold(density, voxel_size: float, box_size: float) -> float:
    """Density iso-level for a NeRF-style density grid (see the module notes).

    ``density``: samples of the field (tensor or array, any shape);
    ``voxel_size``: spacing of the samples; ``box_size``: the longest path a
    ray can take through the field (its box's side).
    """
    peak = float(torch.as_tensor(density).max())
    opaque_in_one_voxel = math.log(2.0) / voxel_size
    opaque_across_box = math.log(2.0) / box_size
    return max(min(0.5 * peak, opaque_in_one_voxel), opaque_across_box)


@torch.no_grad()
def carve_values(points: torch.Tensor, views: DepthViews, margin: float, ramp: float) -> torch.Tensor:
    """How solid each point [M, 3] looks to every view, in [0, 1]; 0.5 is the surface (space carving).

    Per view, a point is as solid as the smaller of two values read at its
    (sub-pixel, bilinear) projection: the render's opacity there, scaled so
    that ``CARVE_SILHOUETTE_OPACITY`` maps to the surface value, and how far
    it lies behind the rendered surface (0.5 at ``margin`` in front of it,
    rising over ``ramp``). The result is the minimum over the views that see
    the point. What survives every view is the solid whose renders match the
    field's; parts no view can see (deep concavities, the inside) stay solid.
    The surface depth is interpolated over pixels that have one only, so a
    silhouette never averages in the infinite depth of the background.
    """
    from recon.camera import project

    device = views.distance.device
    points = points.to(device)
    n_views, height, width = views.distance.shape
    has_depth = torch.isfinite(views.distance)
    solid = (views.opacity * (CARVED_LEVEL / CARVE_SILHOUETTE_OPACITY)).clamp(max=1.0)
    # channels: opacity term, weight of pixels with a depth, weighted depth
    maps = torch.stack([solid, has_depth.float(), torch.where(has_depth, views.distance, torch.zeros_like(views.distance))], dim=1)
    scale = torch.tensor([2.0 / width, 2.0 / height], device=device)
    value = torch.ones(points.shape[0], device=device)
    for index in range(n_views):
        camera = views.cameras[index]
        pixels, _ = project(points, camera, height, width)
        grid = pixels[0] * scale - 1.0  # grid_sample's [-1, 1] spans the outer pixel edges
        seen = (grid.abs() <= 1.0).all(dim=-1)
        sampled = torch.nn.functional.grid_sample(maps[index : index + 1], grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0]
        opacity, weight, weighted = sampled
        surface = weighted / weight.clamp(min=1e-6)
        distance = (points - camera.position[0]).norm(dim=-1)
        behind = torch.where(weight > 1e-3, (0.5 + (distance - surface + margin) / ramp).clamp(0.0, 1.0), torch.ones_like(distance))
        value = torch.where(seen, torch.minimum(value, torch.minimum(opacity, behind)), value)
    return value


def _grid_points(low: np.ndarray, spacing: float, shape: Tuple[int, int, int]) -> torch.Tensor:
    """World positions [X * Y * Z, 3] of the samples ``low + (i, j, k) * spacing``, x slowest."""
    axes = [torch.as_tensor(low[a] + spacing * np.arange(shape[a]), dtype=torch.float32) for a in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _occupied_box(coarse: np.ndarray, level: float, coarse_low: np.ndarray, cell: float, radius: float):
    """(low, high) world corners of the coarse samples above ``level``, padded, within the box."""
    occupied = np.argwhere(coarse > level)
    if len(occupied) == 0:
        raise _empty(level, coarse, radius)
    low = np.maximum(coarse_low + (occupied.min(0) - COARSE_PADDING) * cell, -radius)
    high = np.minimum(coarse_low + (occupied.max(0) + COARSE_PADDING) * cell, radius)
    return low, high


def _fine_grid(low: np.ndarray, high: np.ndarray, resolution: int):
    """(voxel, shape) of isotropic samples with ``resolution`` along the longest side of [low, high]."""
    voxel = float((high - low).max()) / (resolution - 1)
    shape = tuple(int(n) for n in np.floor((high - low) / voxel + 1e-6).astype(int) + 1)
    return voxel, shape


def fill_enclosed(grid: np.ndarray, level: float) -> np.ndarray:
    """Raise every sample that cannot be reached from outside to just above ``level``.

    SDS never sees inside an object, so its density there is unconstrained and
    often spongy; marching cubes would turn that into hundreds of thousands of
    hidden faces (and xatlas would spend minutes on them). Anything enclosed by
    the surface is solid for an asset, so fill it before meshing; the visible
    surface, which borders reachable space, does not move.
    """
    inside = scipy.ndimage.binary_fill_holes(grid > level)
    enclosed = inside & ~(grid > level)
    if not enclosed.any():
        return grid
    filled = grid.copy()
    filled[enclosed] = max(level * 2.0, level + 1.0)
    return filled


@torch.no_grad()
def sample_grid(
    density_fn: DensityFn,
    low: np.ndarray,
    spacing: float,
    shape: Tuple[int, int, int],
    chunk: int = 262144,
    device="cpu",
) -> np.ndarray:
    """Densities at ``low + (i, j, k) * spacing`` for every grid index, as float32 [*shape].

    Points are generated per chunk from flat indices, so a 256^3 grid never
    holds all its coordinates at once.
    """
    nx, ny, nz = shape
    total = nx * ny * nz
    low_t = torch.as_tensor(low, dtype=torch.float32, device=device)
    out = np.empty(total, dtype=np.float32)
    for start in range(0, total, chunk):
        index = torch.arange(start, min(start + chunk, total), device=device)
        ijk = torch.stack([index // (ny * nz), (index // nz) % ny, index % nz], dim=-1)
        points = low_t + ijk.to(torch.float32) * spacing
        density = density_fn(points).reshape(-1).float()
        out[start : start + len(index)] = density.cpu().numpy()
    # A NaN (a diverged field) would make marching cubes emit garbage; read it as empty.
    return np.nan_to_num(out, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0).reshape(shape)


def _device_of(density_fn: DensityFn) -> torch.device:
    module = getattr(density_fn, "__self__", density_fn)
    if isinstance(module, torch.nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return tensor.device
    return torch.device("cpu")


def _empty(level: float, grid: np.ndarray, radius: float) -> ReconError:
    return ReconError(
        f"the field is empty: no density above the iso-level {level:.4g} in the box [-{radius:g}, {radius:g}]^3 "
        f"(peak density {float(grid.max()):.4g}); the fit produced no object: check the input's cut-out, "
        f"train longer, or set extract.threshold lower"
    )


def _clean(mesh: trimesh.Trimesh, merge: bool = True) -> trimesh.Trimesh:
    """Merge duplicate vertices, drop degenerate and repeated faces and unused vertices.

    Degenerate means a repeated vertex index (marching cubes emits these where
    the surface passes exactly through a grid sample, decimation where it
    collapses an edge); dropping them keeps a closed surface closed. A sliver
    with three distinct but collinear vertices stays: removing it would open
    a hole in the topology for no visible gain. Decimated meshes are not
    merged: the decimator can move two separate vertices onto one point, and
    welding them would pinch the surface (which is also why the decimator is
    called directly: trimesh's wrapper welds).
    """
    if merge:
        mesh.merge_vertices()
    faces = np.asarray(mesh.faces)
    distinct = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    mesh.update_faces(distinct)
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    return mesh


def _drop_small_components(mesh: trimesh.Trimesh, min_ratio: float) -> trimesh.Trimesh:
    """Keep the components with at least ``min_ratio`` of the largest one's faces.

    Components are taken over shared vertices, not shared edges: marching cubes
    can pinch a surface to a single vertex, and that is still one object.
    """
    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        return mesh
    n = len(mesh.vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = scipy.sparse.coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, vertex_label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    face_label = vertex_label[faces[:, 0]]
    face_count = np.bincount(face_label)
    keep = face_count[face_label] >= min_ratio * face_count.max()
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def _decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification) to at most ``max_faces`` faces.

    The decimator's aggressive settings sometimes fold the surface into a few
    non-manifold edges; gentler settings avoid that but may stop above the
    budget. So try from gentle to aggressive and keep the first result that
    is within budget and as closed as its input.
    """
    closed = mesh.is_watertight
    fallback = None
    for aggression in (5, 7, 9):
        vertices, faces = fast_simplification.simplify(
            np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), target_count=max_faces, agg=aggression
        )
        simplified = _clean(trimesh.Trimesh(vertices, faces, process=False), merge=False)
        if len(simplified.faces) > max_faces:
            continue
        if simplified.is_watertight or not closed:
            return simplified
        fallback = fallback or simplified
    if fallback is None:
        raise ReconError(f"could not decimate the mesh of {len(mesh.faces)} faces to extract.max_faces={max_faces}")
    log.info("extract: decimation to %d faces left a few non-manifold edges", max_faces)
    return fallback


def _orient_outward(mesh: trimesh.Trimesh) -> None:
    """Make the winding consistent and the enclosed volume positive (normals out).

    The sign is decided for the whole mesh, not per component: an inner
    component bounding a cavity rightly has normals pointing into the cavity.
    """
    if len(mesh.faces) == 0:
        return
    if not mesh.is_winding_consistent:
        trimesh.repair.fix_winding(mesh)
    if mesh.volume < 0:
        mesh.invert()
