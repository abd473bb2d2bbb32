"""The mesh rasteriser against hand-computed coverage, ray casting and known textures."""

import math

import pytest
import torch
import trimesh

from recon.camera import Cameras, generate_rays, orbit_cameras, project
from recon.mesh.data import MeshData
from recon.render.mesh_raster import rasterize, rasterize_uv, render_mesh


def quad(center_x=0.0, half=0.5, y=0.0, z=0.0):
    """A square in the plane x = center_x facing +x (the camera at azimuth 0), CCW seen from +x."""
    vertices = torch.tensor(
        [[center_x, y - half, z - half], [center_x, y + half, z - half], [center_x, y + half, z + half], [center_x, y - half, z + half]]
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return vertices, faces, uvs


def front_camera(fovy=2 * math.degrees(math.atan(0.5)), distance=2.0):
    # focal = 0.5 H / tan(fovy / 2) = H with this fovy, so x_pixel = H/2 + H * y_world / distance
    return Cameras.make(0.0, 0.0, distance, fovy)


def test_single_triangle_covers_pixels_with_centres_inside():
    xy = torch.tensor([[[0.0, 0.0], [4.2, 0.0], [0.0, 4.2]]])
    frags = rasterize(xy, torch.ones(1, 3), torch.tensor([[0, 1, 2]]), 6, 7)
    row, col = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    expected = (row + 0.5) + (col + 0.5) < 4.2
    assert frags.face_id.shape == (1, 6, 7)
    assert torch.equal(frags.mask[0], expected)
    assert torch.all(frags.face_id[0][expected] == 0)
    assert torch.all(frags.depth[0][expected] == 1.0)


def test_square_lands_on_expected_pixels_both_windings():
    xy = torch.tensor([[[1.0, 2.0], [5.0, 2.0], [5.0, 4.0], [1.0, 4.0]]])
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[2:4, 1:5] = True
    for faces in (torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.tensor([[0, 2, 1], [0, 3, 2]])):
        frags = rasterize(xy, torch.ones(1, 4), faces, 6, 8)
        assert torch.equal(frags.mask[0], expected)


def test_projected_square_position_and_orientation():
    # Centred at world (y, z) = (0.25, 0.25): right of and above the image centre.
    vertices, faces, _ = quad(half=0.25, y=0.25, z=0.25)
    out = render_mesh(MeshData(vertices, faces), front_camera(), 64)
    # x_pixel = 32 + 64 * y / 2: y in [0, 0.5] -> columns 32..47; rows likewise 16..31 (up is -row).
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[16:32, 32:48] = True
    assert torch.equal(out["alpha"][0, ..., 0] > 0, expected)
    assert torch.allclose(out["depth"][0][expected], torch.tensor(2.0))
    assert torch.allclose(out["normal"][0][expected], torch.tensor([1.0, 0.0, 0.0]))


def test_nearest_quad_wins_whatever_the_face_order():
    far_v, far_f, _ = quad(center_x=0.0, half=0.5)
    near_v, near_f, _ = quad(center_x=0.3, half=0.25, y=0.25)
    for first_near in (False, True):
        parts = [(near_v, near_f), (far_v, far_f)] if first_near else [(far_v, far_f), (near_v, near_f)]
        vertices = torch.cat([parts[0][0], parts[1][0]])
        faces = torch.cat([parts[0][1], parts[1][1] + 4])
        near_ids = {0, 1} if first_near else {2, 3}
        out = render_mesh(MeshData(vertices, faces), front_camera(), 64)
        depth, face_id = out["depth"][0], out["face_id"][0]
        near_pixels = torch.tensor([[f.item() in near_ids for f in row] for row in face_id])
        assert near_pixels.sum() > 100
        assert torch.allclose(depth[near_pixels], torch.tensor(1.7), atol=1e-5)
        far_pixels = (face_id >= 0) & ~near_pixels
        assert torch.allclose(depth[far_pixels], torch.tensor(2.0), atol=1e-5)
        # The near quad spans world y in [0, 0.5] -> columns 32..47 at depth 1.7: (32 + 64*0.5/1.7)
        assert near_pixels[32, 32:50].sum() == 18


def test_perspective_correct_barycentrics_reproduce_surface_points():
    # A steeply tilted triangle: screen-space (affine) barycentrics would be visibly wrong here.
    vertices = torch.tensor([[0.8, -0.6, -0.5], [-0.8, 0.7, -0.4], [0.2, 0.1, 0.7]])
    faces = torch.tensor([[0, 1, 2]])
    cameras = Cameras.make([10.0, -20.0], [0.0, 30.0], 2.0, 50.0)
    xy, depth = project(vertices, cameras, 48)
    frags = rasterize(xy, depth, faces, 48)
    assert frags.mask.sum() > 200
    for n in range(2):
        mask = frags.mask[n]
        points = (frags.bary[n][mask][:, :, None] * vertices[None]).sum(dim=1)
        # Each interpolated surface point must lie on its pixel's ray at the reported depth.
        back_xy, back_depth = project(points, cameras[n], 48)
        rows, cols = mask.nonzero().unbind(1)
        centres = torch.stack([cols, rows], dim=-1).float() + 0.5
        assert torch.allclose(back_xy[0], centres, atol=1e-3)
        assert torch.allclose(back_depth[0], frags.depth[n][mask], atol=1e-5)
        assert torch.allclose(frags.bary[n][mask].sum(-1), torch.tensor(1.0), atol=1e-5)


def test_chunking_does_not_change_the_result():
    mesh = trimesh.creation.icosphere(subdivisions=2)
    vertices = torch.tensor(mesh.vertices, dtype=torch.float32) * 0.6
    faces = torch.tensor(mesh.faces)
    cameras = orbit_cameras(3, 20.0, 2.0, 45.0)
    xy, depth = project(vertices, cameras, 40)
    whole = rasterize(xy, depth, faces, 40)
    chunked = rasterize(xy, depth, faces, 40, chunk_fragments=97)
    assert torch.equal(whole.face_id, chunked.face_id)
    assert torch.equal(whole.depth, chunked.depth)


def test_triangles_behind_the_camera_are_ignored():
    xy = torch.tensor([[[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]]])
    for depth in ([1.0, 1.0, -1.0], [-1.0, -2.0, -1.0], [0.0, 1.0, 1.0]):
        frags = rasterize(xy, torch.tensor([depth]), torch.tensor([[0, 1, 2]]), 8)
        assert not frags.mask.any()


def test_texture_orientation_top_left_texel_appears_top_left():
    vertices, faces, uvs = quad(half=0.5)
    texture = torch.zeros(2, 2, 3)
    texture[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # top-left: red
    texture[0, 1] = torch.tensor([0.0, 1.0, 0.0])  # top-right: green
    texture[1, 0] = torch.tensor([0.0, 0.0, 1.0])  # bottom-left: blue
    texture[1, 1] = torch.tensor([1.0, 1.0, 1.0])  # bottom-right: white
    mesh = MeshData(vertices, faces, uvs=uvs, face_uvs=faces.clone(), texture=texture)
    rgb = render_mesh(mesh, front_camera(), 64)["rgb"][0]
    # The quad spans pixels 16..47; sample well inside each quadrant's texel (away from bilinear blends).
    assert torch.allclose(rgb[18, 18], texture[0, 0], atol=1e-5)
    assert torch.allclose(rgb[18, 45], texture[0, 1], atol=1e-5)
    assert torch.allclose(rgb[45, 18], texture[1, 0], atol=1e-5)
    assert torch.allclose(rgb[45, 45], texture[1, 1], atol=1e-5)
    # Background stays white and the centre is the bilinear average of all four texels.
    assert torch.allclose(rgb[2, 2], torch.ones(3))
    assert torch.allclose(rgb[31:33, 31:33].mean(dim=(0, 1)), texture.mean(dim=(0, 1)), atol=0.05)


def test_uv_wrap_modes():
    vertices, faces, uvs = quad(half=0.5)
    texture = torch.zeros(1, 4, 3)
    texture[0, 0] = 1.0  # only the leftmost column is white
    shifted = uvs * 0.25 + torch.tensor([1.0, 0.0])  # u in [1, 1.25]: wraps onto the first texel column
    mesh = MeshData(vertices, faces, uvs=shifted, face_uvs=faces.clone(), texture=texture)
    repeat = render_mesh(mesh, front_camera(), 64, uv_wrap="repeat")["rgb"][0]
    clamp = render_mesh(mesh, front_camera(), 64, uv_wrap="clamp")["rgb"][0]
    assert torch.allclose(repeat[32, 18], torch.ones(3), atol=1e-5)
    assert torch.allclose(clamp[32, 18], torch.zeros(3), atol=1e-5)


def test_vertex_colours_interpolate_and_lambert_darkens():
    vertices, faces, _ = quad(half=0.5)
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    mesh = MeshData(vertices, faces, vertex_colors=colors)
    out = render_mesh(mesh, front_camera(), 64)
    rgb = out["rgb"][0]
    # vertex 0 is (y=-0.5, z=-0.5): image bottom-left; vertex 2 is top-right.
    assert torch.allclose(rgb[47, 16], colors[0], atol=0.05)
    assert torch.allclose(rgb[47, 47], colors[1], atol=0.05)
    assert torch.allclose(rgb[16, 47], colors[2], atol=0.05)
    assert torch.allclose(rgb[16, 16], colors[3], atol=0.05)
    # The centre lies on the shared edge from vertex 0 to 2, so only those two colours mix there.
    assert torch.allclose(rgb[31, 32], (colors[0] + colors[2]) / 2, atol=0.05)
    lit = render_mesh(mesh, Cameras.make(0.0, 60.0, 2.0, 50.0), 64, shading="lambert")
    unlit = render_mesh(mesh, Cameras.make(0.0, 60.0, 2.0, 50.0), 64, shading="albedo")
    mask = lit["alpha"][0, ..., 0] > 0
    ratio = lit["rgb"][0][mask].sum() / unlit["rgb"][0][mask].sum()
    assert 0.4 < ratio < 0.9  # seen at ~60 degrees: ambient + (1 - ambient) cos ~ 0.6


def test_plain_mesh_renders_grey_and_shaded():
    mesh = trimesh.creation.icosphere(subdivisions=3)
    out = render_mesh(MeshData(torch.tensor(mesh.vertices, dtype=torch.float32) * 0.5, torch.tensor(mesh.faces)), orbit_cameras(1, 0.0, 2.0, 40.0), 64)
    rgb, mask = out["rgb"][0], out["alpha"][0, ..., 0] > 0
    grey = rgb[mask]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], grey[:, 2])
    assert grey.max() <= 0.5 + 1e-6 and grey.min() > 0.1
    assert grey.max() - grey.min() > 0.2  # shading shows the shape: the centre is brighter than the rim
    assert rgb[32, 32, 0] > rgb[32, 44, 0]


def _ray_cast(origins, directions, vertices, faces):
    """Nearest hit distance per ray (inf when missed), Moller-Trumbore against every face."""
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    e1, e2 = b - a, c - a
    o, d = origins[:, None], directions[:, None]
    p = torch.linalg.cross(d.expand(-1, len(faces), -1), e2.expand(len(o), -1, -1), dim=-1)
    det = (e1 * p).sum(-1)
    inv = 1.0 / det
    s = o - a
    u = (s * p).sum(-1) * inv
    q = torch.linalg.cross(s, e1.expand(len(o), -1, -1), dim=-1)
    v = (d * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    hit = (det.abs() > 1e-12) & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    return torch.where(hit, t, torch.full_like(t, math.inf)).amin(dim=1)


def test_agrees_with_ray_casting_on_an_icosphere():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float64) * torch.tensor([0.6, 0.45, 0.5], dtype=torch.float64)
    faces = torch.tensor(sphere.faces)
    cameras = Cameras.make([15.0, -40.0], [20.0, 200.0], [2.0, 1.6], [45.0, 50.0])
    size = 40
    out = render_mesh(MeshData(vertices.float(), faces), cameras, size)
    origins, directions = generate_rays(cameras, size)
    forward = -torch.nn.functional.normalize(cameras.position, dim=-1)
    for n in range(len(cameras)):
        t = _ray_cast(origins[n].reshape(-1, 3).double(), directions[n].reshape(-1, 3).double(), vertices, faces)
        hit = torch.isfinite(t).reshape(size, size)
        mask = out["alpha"][n, ..., 0] > 0
        assert hit.sum() > 300
        # Pixel centres within float rounding of a silhouette edge may go either way; allow a handful.
        assert (hit != mask).sum() <= 3
        both = hit & mask
        ray_depth = (t.reshape(size, size)[both] * (directions[n][both].double() @ forward[n].double()))
        assert torch.allclose(out["depth"][n][both].double(), ray_depth, atol=1e-4)


def test_rasterize_uv_covers_every_texel_of_a_full_layout():
    # A 3x3 grid of quads covering [0, 1]^2, split into triangles: every texel must be covered once
    # and its barycentrics must reproduce the texel centre's uv.
    g = torch.linspace(0, 1, 4)
    vv, uu = torch.meshgrid(g, g, indexing="ij")
    uvs = torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=-1)
    i, j = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    corner = (i * 4 + j).reshape(-1)
    face_uvs = torch.cat([torch.stack([corner, corner + 1, corner + 5], -1), torch.stack([corner, corner + 5, corner + 4], -1)])
    size = 32
    frags = rasterize_uv(uvs, face_uvs, size)
    assert frags.face_id.shape == (1, size, size)
    assert frags.mask.all()
    uv = (frags.bary[0][..., None] * uvs[face_uvs[frags.face_id[0]]]).sum(dim=-2)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    expected = torch.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], dim=-1)
    assert torch.allclose(uv, expected, atol=1e-5)


def test_rasterize_uv_covers_exactly_a_triangles_texels():
    # Lower-left half of the texture: u + v < 1, with row 0 at the top (v close to 1).
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    frags = rasterize_uv(uvs * 0.999, torch.tensor([[0, 1, 2]]), 16)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    u, v = (cols + 0.5) / 16, 1.0 - (rows + 0.5) / 16
    assert torch.equal(frags.mask[0], u + v < 0.999)
    assert frags.mask[0, 15, 0] and not frags.mask[0, 0, 15]  # bottom-left in, top-right out


def test_ssaa_antialiases_edges():
    vertices, faces, _ = quad(half=0.2)
    vertices = vertices @ torch.tensor([[1.0, 0, 0], [0, 0.8, 0.6], [0, -0.6, 0.8]])  # rotate about x: slanted edges
    mesh = MeshData(vertices, faces, vertex_colors=torch.zeros(4, 3))
    plain = render_mesh(mesh, front_camera(), 32)
    smooth = render_mesh(mesh, front_camera(), 32, ssaa=4)
    alpha = smooth["alpha"][0, ..., 0]
    assert smooth["rgb"].shape == (1, 32, 32, 3) and smooth["face_id"].shape == (1, 32, 32)
    partial = (alpha > 0) & (alpha < 1)
    assert partial.sum() > 10
    # Area is preserved up to edge rounding, and partial pixels blend black into the white background.
    assert abs(alpha.sum() - plain["alpha"].sum()) < 0.05 * plain["alpha"].sum()
    assert torch.allclose(smooth["rgb"][0][partial][:, 0], 1.0 - alpha[partial], atol=1e-5)
    assert torch.allclose(smooth["depth"][0][alpha == 1], torch.tensor(2.0), atol=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    sphere = trimesh.creation.icosphere(subdivisions=4)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32) * 0.5
    colors = 0.5 + 0.5 * torch.sin(4.0 * vertices)
    mesh = MeshData(vertices, torch.tensor(sphere.faces), vertex_colors=colors)
    cameras = orbit_cameras(4, 30.0, 2.0, 40.0)
    cpu = render_mesh(mesh, cameras, 96, ssaa=2)
    gpu = render_mesh(mesh.to("cuda"), cameras.to("cuda"), 96, ssaa=2)
    for key in ("rgb", "alpha", "depth", "normal"):
        assert gpu[key].device.type == "cuda"
        # Fused multiply-adds on the GPU can flip a pixel centre lying exactly on an edge; allow a few.
        close = (gpu[key].cpu() - cpu[key]).abs().reshape(-1) < 1e-3
        assert close.float().mean() > 0.999, key
