"""Texturing: xatlas UVs, albedo baked from the field into a texture, seams filled.

The field's albedo head is queried at the 3D surface point behind every texel
that a UV chart covers (rasterised with ``rasterize_uv``). Texels outside the
charts then take the colour of their nearest chart texel, so bilinear filtering
and mipmaps never blend in an unwritten (black) colour across a seam.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch
from scipy import ndimage

from recon.mesh.data import MeshData
from recon.render.mesh_raster import rasterize_uv

AlbedoFn = Callable[[torch.Tensor], torch.Tensor]  # points [P, 3] -> colours [P, 3] in [0, 1]

QUERY_CHUNK = 65536  # points per albedo query: large, since the field is fastest in big batches

# xatlas grows each chart until a cost limit is hit; on bumpy marching-cubes meshes that
# unbounded growth makes charting slow and can still end in many tiny charts. Capping each
# chart's boundary length at this fraction of sqrt(surface area) keeps the cost scale-free
# and bounded while covering as many texels as the uncapped default (figures in
# recon/bench/results/bake_speed.json); smaller caps pack ragged charts badly.
MAX_BOUNDARY_FRACTION = 1.0


def unwrap(mesh: MeshData, size: int = 1024, padding: int = 4) -> MeshData:
    """UV-unwrap with xatlas, packed for a ``size`` x ``size`` texture with ``padding`` texels between charts.

    Vertices and faces are kept as they are; xatlas's split vertices become the
    separate ``uvs`` / ``face_uvs`` index, so the geometry stays watertight.
    """
    import xatlas

    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.uint32)

    corners = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1).sum()
    chart_options = xatlas.ChartOptions()
    chart_options.max_boundary_length = float(MAX_BOUNDARY_FRACTION * math.sqrt(max(area, 1e-12)))
    pack_options = xatlas.PackOptions()
    pack_options.resolution = size  # xatlas picks the texel density that roughly fills this size
    pack_options.padding = padding
    pack_options.bilinear = True  # keep a texel of space for bilinear filtering at chart borders
    pack_options.blockAlign = True  # packs on a 4x4 grid: faster, at no measurable cost in texel use

    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    atlas.generate(chart_options, pack_options)
    if atlas.atlas_count != 1:  # one texture only: several atlases would overlap in uv
        raise RuntimeError(f"xatlas made {atlas.atlas_count} atlases; expected one")
    vmapping, indices, uvs = atlas[0]
    # xatlas keeps the face order, and its vertex i is a copy of input vertex vmapping[i].
    if indices.shape != faces.shape or not np.array_equal(vmapping[indices], faces):
        raise RuntimeError("xatlas changed the mesh's faces; cannot keep the original geometry")

    device = mesh.device
    return replace(
        mesh,
        uvs=torch.as_tensor(uvs.astype(np.float32), device=device),
        face_uvs=torch.as_tensor(indices.astype(np.int64), device=device),
        texture=None,
    )


def texel_points(mesh: MeshData, size: int, with_normals: bool = False):
    """The texels that the UV charts cover, as a mask [size, size], and their 3D surface points [P, 3].

    ``with_normals`` also returns each texel's outward unit normal [P, 3] (its face's).
    """
    fragments = rasterize_uv(mesh.uvs.to(mesh.device), mesh.face_uvs.to(mesh.device), size)
    face_id = fragments.face_id[0]
    mask = face_id >= 0
    face = face_id[mask]
    corners = mesh.vertices.float()[mesh.faces[face]]  # [P, 3, 3]
    points = (fragments.bary[0][mask][:, :, None] * corners).sum(dim=1)
    if not with_normals:
        return mask, points
    normals = torch.nn.functional.normalize(torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1), dim=-1)
    return mask, points, normals


def vertex_normals(mesh: MeshData) -> torch.Tensor:
    """Area-weighted outward vertex normals [V, 3]."""
    corners = mesh.vertices.float()[mesh.faces]
    face_normals = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)  # length = 2 area
    normals = torch.zeros_like(mesh.vertices, dtype=torch.float32).index_add_(0, mesh.faces.reshape(-1), face_normals.repeat_interleave(3, dim=0))
    return torch.nn.functional.normalize(normals, dim=-1)


@torch.no_grad()
def query_albedo(albedo_fn: AlbedoFn, points: torch.Tensor, chunk: int = QUERY_CHUNK, normals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``albedo_fn`` over points [P, 3] (and ``normals``, when given) in chunks, clamped to [0, 1]: colours [P, 3]."""
    if points.shape[0] == 0:
        return points.new_zeros(0, 3)
    colors = []
    for start in range(0, points.shape[0], chunk):
        part = slice(start, start + chunk)
        colors.append((albedo_fn(points[part]) if normals is None else albedo_fn(points[part], normals[part])).float())
    return torch.cat(colors).clamp(0.0, 1.0)


def fill_seams(texture: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every texel outside ``mask`` the colour of its nearest texel inside.

    Near a chart this is the usual seam padding (bilinear lookups at a chart's
    border read the chart's own colours); far from every chart it still gives a
    plausible colour, so even deep mipmap levels never average in black.
    """
    if mask.all() or not mask.any():
        return texture
    empty = (~mask).cpu().numpy()
    # For each texel, the indices of the nearest zero of ``empty``, i.e. the nearest chart texel.
    rows, cols = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    rows = torch.as_tensor(rows, device=texture.device)
    cols = torch.as_tensor(cols, device=texture.device)
    return texture[rows, cols]


def bake_texture(
    mesh: MeshData, albedo_fn: AlbedoFn, size: int = 1024, padding: int = 4, chunk: int = QUERY_CHUNK, normals: bool = False
) -> MeshData:
    """Bake ``albedo_fn`` into a ``size`` x ``size`` texture over the mesh's UVs.

    A mesh without UVs is unwrapped first (``padding`` texels between charts).
    With ``normals``, ``albedo_fn`` is called as ``albedo_fn(points, normals)``.
    Returns the mesh with ``texture`` [size, size, 3] (and its UVs) set.
    """
    if mesh.uvs is None or mesh.face_uvs is None:
        mesh = unwrap(mesh, size=size, padding=padding)
    texels = texel_points(mesh, size, with_normals=normals)
    mask, points = texels[0], texels[1]
    texture = torch.zeros(size, size, 3, device=mesh.device)
    texture[mask] = query_albedo(albedo_fn, points, chunk, normals=texels[2] if normals else None).to(texture.device)
    return replace(mesh, texture=fill_seams(texture, mask), vertex_colors=None)


def bake_vertex_colors(mesh: MeshData, albedo_fn: AlbedoFn, chunk: int = QUERY_CHUNK, normals: bool = False) -> MeshData:
    """Albedo at each vertex, as vertex colours (the export's "vertex" texture mode)."""
    colors = query_albedo(albedo_fn, mesh.vertices.float(), chunk, normals=vertex_normals(mesh) if normals else None)
    return replace(mesh, vertex_colors=colors.to(mesh.device), uvs=None, face_uvs=None, texture=None)
