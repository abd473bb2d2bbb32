"""A pure-PyTorch triangle rasteriser and mesh renderer.

Used wherever we need pictures of a mesh rather than of the field: ground-truth
views for the reference prior (every training step, so it must be fast),
evaluation views, turntable previews, and texture baking (through
``rasterize_uv``).

How ``rasterize`` works, all vectorised:

1. Each triangle's pixel bounding box is clipped to the image; the pixels whose
   centres lie in it are enumerated with ``repeat_interleave`` (faces are
   processed in chunks so memory stays bounded however large the triangles).
2. Edge functions at the pixel centres keep the pixels inside the triangle.
3. A z-buffer in one pass: each fragment gets an int64 key whose high bits are
   the float32 bit pattern of its depth (positive floats order like their bit
   patterns) and whose low bits are the face id; ``scatter_reduce(amin)`` per
   pixel then picks the nearest face, ties broken by the lower face id.
4. Barycentrics are recomputed for the winning face only, perspective-correct.

Triangles are two-sided (no back-face culling): closed meshes are resolved by
the z-buffer, and open meshes or the inside seen through a hole still render.
Triangles with a vertex at or behind the camera (depth <= ``NEAR``) are dropped
rather than clipped; our cameras orbit outside the object, so that never cuts a
visible triangle in practice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from recon.camera import Cameras, project
from recon.mesh.data import MeshData

NEAR = 1e-4  # vertices closer than this (or behind the camera) drop their triangle
EDGE_EPS = 1e-6  # barycentric slack so pixels exactly on a shared edge are never lost to rounding
CHUNK_FRAGMENTS = 1 << 21  # candidate pixels per chunk: bounds memory at roughly 100 MB
GREY = 0.5  # albedo of a mesh without appearance
AMBIENT = 0.25  # share of the headlight term that does not depend on the angle

_FACE_BITS = 32
_FACE_MASK = (1 << _FACE_BITS) - 1
_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """What covers each pixel: the nearest face, where on it, and how far."""

    face_id: torch.Tensor  # [N, H, W] int64, -1 where no face covers the pixel
    bary: torch.Tensor  # [N, H, W, 3] perspective-correct barycentrics (0 where empty)
    depth: torch.Tensor  # [N, H, W] view-axis depth (0 where empty)

    @property
    def mask(self) -> torch.Tensor:
        return self.face_id >= 0


def _screen_barycentrics(tri: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics [M, 3] of points [M, 2] in triangles [M, 3, 2].

    Dividing the edge functions by the signed area makes them orientation-free:
    inside means all three are >= 0 whichever way the triangle winds.
    """
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]

    def edge(p, q, r):
        return (q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0])

    area = edge(a, b, c)
    safe_area = torch.where(area == 0, torch.ones_like(area), area)
    return torch.stack([edge(b, c, point), edge(c, a, point), edge(a, b, point)], dim=-1) / safe_area[:, None]


def _perspective_correct(screen_bary: torch.Tensor, vertex_depth: torch.Tensor):
    """Perspective-correct barycentrics and depth: 1/z is what is linear in screen space."""
    weights = screen_bary / vertex_depth
    inverse_depth = weights.sum(dim=-1, keepdim=True)
    return weights / inverse_depth, 1.0 / inverse_depth.squeeze(-1)


def rasterize(
    pixel_xy: torch.Tensor,
    depth: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: Optional[int] = None,
    chunk_fragments: int = CHUNK_FRAGMENTS,
) -> Fragments:
    """Rasterise triangles given their projected vertices.

    ``pixel_xy`` [N, V, 2] and ``depth`` [N, V] are what ``recon.camera.project``
    returns (x = column, y = row, pixel centres at +0.5, depth > 0 in front);
    ``faces`` [F, 3] indexes the vertices. A pixel is covered when its centre is
    inside a triangle; the nearest positive depth wins.
    """
    width = width or height
    n_views, device = pixel_xy.shape[0], pixel_xy.device
    n_faces = faces.shape[0]
    pixel_xy = pixel_xy.float()
    depth = depth.float()

    # Every (view, face) pair is one triangle to draw. The z-buffer holds integers only, so it is
    # built without autograd's history; gradients reach the barycentrics in _resolve.
    tri_xy = pixel_xy.detach()[:, faces].reshape(-1, 3, 2)  # [N*F, 3, 2]
    tri_z = depth.detach()[:, faces].reshape(-1, 3)  # [N*F, 3]

    # Pixel i has its centre at i + 0.5, so it is in [lo, hi] when ceil(lo - 0.5) <= i <= floor(hi - 0.5).
    # Clamping before the int conversion keeps huge coordinates (vertices near the camera plane) finite.
    limit = torch.tensor([width, height], device=device)
    lo = (tri_xy.amin(dim=1) - 0.5).clamp(-1, max(width, height)).ceil().long().clamp(min=0)
    hi = torch.minimum((tri_xy.amax(dim=1) - 0.5).clamp(-1, max(width, height)).floor().long(), limit - 1)
    box = (hi - lo + 1).clamp(min=0)  # [N*F, 2] width and height of the pixel box
    in_front = (tri_z > NEAR).all(dim=1) & torch.isfinite(tri_xy).all(dim=2).all(dim=1)
    counts = box[:, 0] * box[:, 1] * in_front

    # Only triangles that can cover a pixel go on.
    kept = counts.nonzero().squeeze(1)
    tri_xy, tri_z, lo, box, counts = tri_xy[kept], tri_z[kept], lo[kept], box[kept], counts[kept]
    view_of = torch.div(kept, n_faces, rounding_mode="floor")
    face_of = kept - view_of * n_faces
    planes = _triangle_planes(tri_xy - lo[:, None].float(), tri_z)
    corner_pixel = (view_of * height + lo[:, 1]) * width + lo[:, 0]

    zbuffer = torch.full((n_views * height * width,), _EMPTY, dtype=torch.int64, device=device)
    ends = counts.cumsum(0)
    total = int(ends[-1]) if ends.numel() else 0
    # Chunk boundaries fall between faces, at the first face that passes each multiple of the budget.
    n_chunks = (total + chunk_fragments - 1) // chunk_fragments
    splits = torch.searchsorted(ends, torch.arange(1, max(n_chunks, 1), device=device) * chunk_fragments, right=True)
    bounds = [0] + splits.tolist() + [counts.numel()]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            part = slice(start, stop)
            _rasterize_chunk(zbuffer, planes[part], face_of[part], corner_pixel[part], box[part, 0], counts[part], width)
    return _resolve(zbuffer, pixel_xy, depth, faces, n_views, height, width)


def _triangle_planes(local_xy: torch.Tensor, tri_z: torch.Tensor) -> torch.Tensor:
    """Per triangle, the plane coefficients [T, 4, 3] of its three screen barycentrics and of 1/depth.

    Row r gives ``value = a * x + b * y + c`` at local pixel position (x, y). Positions are
    relative to the triangle's pixel box so the numbers stay small and float32 stays exact
    enough; 1/depth is a plane too because it is affine in screen space.
    """
    a, b, c = local_xy[:, 0], local_xy[:, 1], local_xy[:, 2]

    def edge_plane(p, q):  # edge function (q - p) x (r - p) as a plane in r
        dx, dy = q[:, 0] - p[:, 0], q[:, 1] - p[:, 1]
        return torch.stack([-dy, dx, dy * p[:, 0] - dx * p[:, 1]], dim=-1)

    bary = torch.stack([edge_plane(b, c), edge_plane(c, a), edge_plane(a, b)], dim=1)  # [T, 3, 3]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    # A degenerate triangle gets all-zero planes; its 1/depth of 0 then never wins a pixel.
    scale = torch.where(area == 0, torch.zeros_like(area), 1.0 / area)
    bary = bary * scale[:, None, None]
    inverse_depth = (bary / tri_z[:, :, None]).sum(dim=1, keepdim=True)
    return torch.cat([bary, inverse_depth], dim=1)


def _rasterize_chunk(zbuffer, planes, face_of, corner_pixel, box_w, counts, width):
    """Write the chunk's fragments into the z-buffer (in place)."""
    n_fragments = int(counts.sum())
    triangle = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=n_fragments)
    first = counts.cumsum(0) - counts
    k = torch.arange(n_fragments, device=counts.device) - first[triangle]  # index inside the triangle's box
    # int32 division is several times faster than int64 on CPUs, and boxes are far smaller than 2^31.
    w = box_w.int().index_select(0, triangle)
    row = torch.div(k.int(), w, rounding_mode="floor")
    col = k.int() - row * w

    plane = planes.index_select(0, triangle)  # [M, 4, 3]
    x, y = (col.float() + 0.5)[:, None], (row.float() + 0.5)[:, None]
    values = torch.addcmul(torch.addcmul(plane[:, :, 2], plane[:, :, 0], x), plane[:, :, 1], y)
    inside = (values[:, :3] >= -EDGE_EPS).all(dim=-1) & (values[:, 3] > 0)

    # Positive float32 values order like their int32 bit patterns, so the key sorts by depth, then face;
    # fragments outside their triangle get the empty key and so never win.
    depth_bits = (1.0 / values[:, 3]).contiguous().view(torch.int32).long()
    key = torch.where(inside, (depth_bits << _FACE_BITS) | face_of[triangle], _EMPTY)
    pixel = corner_pixel.index_select(0, triangle) + (row * width + col).long()
    zbuffer.scatter_reduce_(0, pixel, key, reduce="amin")


def _resolve(zbuffer, pixel_xy, depth, faces, n_views, height, width) -> Fragments:
    """Turn the z-buffer into face ids, and recompute barycentrics for the winners only."""
    device = zbuffer.device
    covered = zbuffer != _EMPTY
    face_id = torch.where(covered, zbuffer & _FACE_MASK, torch.full_like(zbuffer, -1))
    bary = torch.zeros(zbuffer.numel(), 3, device=device)
    out_depth = torch.zeros(zbuffer.numel(), device=device)

    pixel = covered.nonzero().squeeze(1)
    if pixel.numel():
        face = face_id[pixel]
        view = torch.div(pixel, height * width, rounding_mode="floor")
        rest = pixel - view * height * width
        centre = torch.stack([rest % width, torch.div(rest, width, rounding_mode="floor")], dim=-1).float() + 0.5
        corners = faces[face]  # [M, 3]
        tri_xy = pixel_xy[view[:, None], corners]  # [M, 3, 2]
        tri_z = depth[view[:, None], corners]  # [M, 3]
        # The edge slack lets barycentrics dip just below 0; clamp so interpolation never extrapolates.
        screen = _screen_barycentrics(tri_xy, centre).clamp(min=0)
        screen = screen / screen.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        bary[pixel], out_depth[pixel] = _perspective_correct(screen, tri_z)

    return Fragments(
        face_id=face_id.view(n_views, height, width),
        bary=bary.view(n_views, height, width, 3),
        depth=out_depth.view(n_views, height, width),
    )


def antialias_edges(image: torch.Tensor, face_id: torch.Tensor, pixel_xy: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Blend a hard render [N, H, W, C] across its silhouette edges, differentiably in ``pixel_xy``.

    ``face_id`` [N, H, W] is the render's (-1 where empty), ``pixel_xy`` [N, V, 2] the projected
    vertices it was rasterised from (``recon.camera.project``), ``faces`` [F, 3].

    Which pixel centres a face covers is a step function of its vertices, so a hard render has no
    gradient that moves a silhouette. After nvdiffrast's antialiasing (Laine et al. 2020, "Modular
    primitives for high-performance differentiable rendering"): take each pair of horizontally or
    vertically adjacent pixels p, q where the face f at p ends and what lies behind it shows at q
    (the background, or a face that also covers p's centre, so continues behind f). The edge of f
    that the segment from p's centre to q's leaves through crosses it at a fraction t from p. A
    pixel-wide box filter would see f cover 0.5 + t of p and t - 0.5 of q, so p takes
    max(0.5 - t, 0) of q's colour and q takes max(t - 0.5, 0) of p's. The result is the hard render
    where the edge lies midway between the centres, is continuous as the edge sweeps over a centre,
    and its gradient moves the edge through t.

    Each crossing is blended once: horizontal pairs take edges steeper than 45 degrees, vertical pairs
    the others. Only the edges of the face at p are candidates, so a sliver face between p's face and
    the true outline that covers no pixel centre puts the blended edge slightly inside.
    """
    n_views, height, width, channels = image.shape
    device = image.device
    face = face_id.reshape(-1)
    index = torch.arange(face.numel(), device=device).view(n_views, height, width)
    first, second, steps = [], [], []
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        # every pixel whose neighbour (dx, dy) is inside the image, with that neighbour
        p = index[:, max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)].reshape(-1)
        q = p + dy * width + dx
        differ = (face[p] >= 0) & (face[p] != face[q])
        first.append(p[differ])
        second.append(q[differ])
        steps.append(torch.tensor([dx, dy], device=device).expand(int(differ.sum()), 2))
    p, q, step = torch.cat(first), torch.cat(second), torch.cat(steps).float()

    view = torch.div(p, height * width, rounding_mode="floor")
    rest = p - view * height * width
    centre_p = torch.stack([rest % width, torch.div(rest, width, rounding_mode="floor")], dim=-1).float() + 0.5
    centre_q = centre_p + step
    with torch.no_grad():
        tri = pixel_xy.detach()[view[:, None], faces[face[p]]]  # [M, 3, 2]
        inside_p, inside_q = _screen_barycentrics(tri, centre_p), _screen_barycentrics(tri, centre_q)
        # Barycentric i is affine along the segment and 0 on the edge opposite corner i:
        # the segment leaves the triangle where the first one that turns negative reaches 0.
        crossing = torch.where(inside_q < 0, inside_p / (inside_p - inside_q).clamp(min=1e-12), torch.full_like(inside_p, float("inf")))
        t, edge = crossing.min(dim=1)
        rows = torch.arange(edge.numel(), device=device)
        direction = tri[rows, (edge + 2) % 3] - tri[rows, (edge + 1) % 3]
        steep = direction[:, 1].abs() >= direction[:, 0].abs()
        behind = face[q]
        continues = (_screen_barycentrics(pixel_xy.detach()[view[:, None], faces[behind.clamp(min=0)]], centre_p) >= 0).all(dim=1)
        keep = torch.isfinite(t) & (steep == (step[:, 0] != 0)) & ((behind < 0) | continues)
    p, q, view, edge = p[keep], q[keep], view[keep], edge[keep]
    centre_p, centre_q = centre_p[keep], centre_q[keep]

    # The crossing again, now with gradients: only the leaving edge's barycentric matters.
    tri = pixel_xy.float()[view[:, None], faces[face[p]]]
    at_p = _screen_barycentrics(tri, centre_p).gather(1, edge[:, None])
    at_q = _screen_barycentrics(tri, centre_q).gather(1, edge[:, None])
    t = (at_p / (at_p - at_q)).clamp(0.0, 1.0)  # [M, 1]

    flat = image.reshape(-1, channels)
    difference = flat[p] - flat[q]
    blended = flat.index_add(0, p, difference * (t - 0.5).clamp(max=0.0)).index_add(0, q, difference * (t - 0.5).clamp(min=0.0))
    return blended.view(n_views, height, width, channels)


def rasterize_uv(uvs: torch.Tensor, face_uvs: torch.Tensor, size: int) -> Fragments:
    """Rasterise the UV layout at texel centres (for baking), one view: [1, size, size].

    Texture row 0 is the top (v close to 1) and uv (0, 0) is the bottom-left
    corner, so texel (row j, column i) has its centre at u = (i + 0.5) / size,
    v = 1 - (j + 0.5) / size. A constant depth makes the barycentrics affine in uv.
    """
    uvs = uvs.float()
    pixel_xy = torch.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], dim=-1)[None]
    depth = torch.ones(1, uvs.shape[0], device=uvs.device)
    return rasterize(pixel_xy, depth, face_uvs, size, size)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor, wrap: str = "repeat") -> torch.Tensor:
    """Bilinear texture lookup: texture [Ht, Wt, C], uv [P, 2] -> [P, C].

    ``wrap="repeat"`` tiles uv coordinates outside [0, 1] (glTF's default) and
    ``"clamp"`` clamps them. Either way the 2x2 filter footprint is clamped at the
    image border rather than wrapped, so a UV atlas never blends in texels from
    its opposite edge.
    """
    tex_h, tex_w = texture.shape[:2]
    if wrap == "repeat":
        uv = uv - torch.floor(uv)
    elif wrap == "clamp":
        uv = uv.clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown wrap mode {wrap!r}: use 'repeat' or 'clamp'")
    x = uv[:, 0] * tex_w - 0.5
    y = (1.0 - uv[:, 1]) * tex_h - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    xa, xb = x0.clamp(0, tex_w - 1), (x0 + 1).clamp(0, tex_w - 1)
    ya, yb = y0.clamp(0, tex_h - 1), (y0 + 1).clamp(0, tex_h - 1)
    top = texture[ya, xa] * (1 - fx) + texture[ya, xb] * fx
    bottom = texture[yb, xa] * (1 - fx) + texture[yb, xb] * fx
    return top * (1 - fy) + bottom * fy


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit normals [F, 3] of counter-clockwise faces (outward for a closed mesh)."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    return F.normalize(torch.linalg.cross(b - a, c - a, dim=-1), dim=-1)


def render_mesh(
    mesh: MeshData,
    cameras: Cameras,
    height: int,
    width: Optional[int] = None,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    shading: str = "albedo",
    ssaa: int = 1,
    uv_wrap: str = "repeat",
    antialias: bool = False,
) -> dict:
    """Render a mesh from each camera.

    Returns ``rgb`` [N, H, W, 3] composited over ``background``, ``alpha``
    [N, H, W, 1], ``depth`` [N, H, W] (0 where empty), ``normal`` [N, H, W, 3]
    (world-space face normals, 0 where empty) and ``face_id`` [N, H, W] (-1 where empty).

    ``shading="albedo"`` shows the unlit texture or vertex colours; a mesh with no
    appearance is drawn mid grey under a headlight so its shape is visible.
    ``shading="lambert"`` multiplies the albedo by the headlight term.
    ``ssaa=k`` renders k times larger and averages k x k blocks: alpha becomes
    coverage, rgb is averaged after compositing, depth and normals are averaged
    over the covered samples, and face_id is the block's centre-most sample.

    Differentiable with respect to the texture and vertex colours, and to the
    vertices through the barycentrics of covered pixels. Coverage itself, the
    silhouette, has a gradient only with ``antialias=True``: rgb and alpha are
    then blended across silhouette edges (:func:`antialias_edges`) before the
    ssaa average. Without inputs that need gradients, autograd records nothing.
    """
    if shading not in ("albedo", "lambert"):
        raise ValueError(f"unknown shading {shading!r}: use 'albedo' or 'lambert'")
    width = width or height
    device = mesh.device
    cameras = cameras.to(device)
    big_h, big_w = height * ssaa, width * ssaa
    vertices = mesh.vertices.float()
    faces = mesh.faces.long()

    pixel_xy, depth = project(vertices, cameras, big_h, big_w)
    fragments = rasterize(pixel_xy, depth, faces, big_h, big_w)
    n_views = len(cameras)

    # Shade only covered pixels, as a flat list.
    face_id = fragments.face_id.reshape(-1)
    pixel = (face_id >= 0).nonzero().squeeze(1)
    face = face_id[pixel]
    bary = fragments.bary.reshape(-1, 3)[pixel]
    view = torch.div(pixel, big_h * big_w, rounding_mode="floor")

    normals = face_normals(vertices, faces)[face]
    has_appearance = mesh.has_texture or mesh.vertex_colors is not None
    if mesh.has_texture:
        uv = (mesh.uvs.float()[mesh.face_uvs.long()[face]] * bary[:, :, None]).sum(dim=1)
        albedo = sample_texture(mesh.texture.float(), uv, wrap=uv_wrap)
    elif mesh.vertex_colors is not None:
        albedo = (mesh.vertex_colors.float()[faces[face]] * bary[:, :, None]).sum(dim=1)
    else:
        albedo = torch.full((pixel.numel(), 3), GREY, device=device)

    if shading == "lambert" or not has_appearance:
        # Headlight: light comes from the camera. |cos| so that inner or back faces are lit too.
        surface = (vertices[faces[face]] * bary[:, :, None]).sum(dim=1)
        to_camera = F.normalize(cameras.position[view] - surface, dim=-1)
        cosine = (normals * to_camera).sum(dim=-1, keepdim=True).abs()
        albedo = albedo * (AMBIENT + (1.0 - AMBIENT) * cosine)

    def scatter(values: torch.Tensor, channels: int) -> torch.Tensor:
        image = torch.zeros(n_views * big_h * big_w, channels, device=device)
        image[pixel] = values.float()
        return image.view(n_views, big_h, big_w, channels)

    alpha = (fragments.face_id >= 0).float()[..., None]
    color = scatter(albedo.clamp(0.0, 1.0), 3)
    normal = scatter(normals, 3)
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    rgb = color * alpha + bg * (1.0 - alpha)
    out_depth = fragments.depth
    out_face = fragments.face_id
    coverage = alpha
    if antialias:
        blended = antialias_edges(torch.cat([rgb, alpha], dim=-1), fragments.face_id, pixel_xy, faces)
        rgb, coverage = blended[..., :3], blended[..., 3:]

    if ssaa > 1:
        def pool(image):  # [N, h, w, C] -> [N, H, W, C], mean over k x k blocks
            return F.avg_pool2d(image.permute(0, 3, 1, 2), ssaa).permute(0, 2, 3, 1)

        # depth and normals average over the covered samples of the hard render
        safe = pool(alpha).clamp(min=1e-8)
        coverage = pool(coverage)
        rgb = pool(rgb)
        out_depth = (pool(out_depth[..., None] * alpha) / safe).squeeze(-1)
        normal = F.normalize(pool(normal), dim=-1)
        out_face = out_face[:, ssaa // 2 :: ssaa, ssaa // 2 :: ssaa]

    return {"rgb": rgb, "alpha": coverage, "depth": out_depth, "normal": normal, "face_id": out_face}
