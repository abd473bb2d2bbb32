"""Texture refinement: the rasteriser's gradients against finite differences, the fixed-geometry
renderer against render_mesh, and a fitted object whose mesh gets closer to the truth. Vertex
offsets: the antialiased silhouette's gradient, the Laplacian term, and a short bounded fit."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import torch

from recon.bench.procedural import crate, save_obj
from recon.camera import Cameras
from recon.cli import main
from recon.config import CameraConfig, PriorConfig, RefineConfig
from recon.eval.metrics import psnr
from recon.mesh.data import MeshData
from recon.mesh.refine import refine_texture, render_texture, texel_views, truth_sampling, uniform_laplacian
from recon.prior.reference import ReferencePrior
from recon.render.mesh_raster import render_mesh


def textured_quad(texture_size=8):
    """A unit square facing the camera at azimuth 0, with a smooth random texture."""
    vertices = torch.tensor([[0.0, -0.5, -0.5], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texture = torch.rand(texture_size, texture_size, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    return MeshData(vertices, faces, uvs=uvs, face_uvs=faces.clone(), texture=texture)


def front_camera():
    return Cameras.make(0.0, 0.0, 2.0, 2 * math.degrees(math.atan(0.5)))


def test_texture_gradient_matches_finite_differences():
    mesh = textured_quad()
    weights = torch.rand(1, 24, 24, 3, generator=torch.Generator().manual_seed(1))

    def loss(texture):
        rgb = render_mesh(MeshData(mesh.vertices, mesh.faces, uvs=mesh.uvs, face_uvs=mesh.face_uvs, texture=texture), front_camera(), 24)["rgb"]
        return (rgb * weights).sum()

    texture = mesh.texture.clone().requires_grad_(True)
    loss(texture).backward()
    eps = 1e-2  # the loss is linear in the texture: differences are exact up to float rounding
    for index in [(0, 0, 0), (3, 4, 1), (7, 7, 2), (5, 2, 0)]:
        bumped = mesh.texture.clone()
        bumped[index] += eps
        lowered = mesh.texture.clone()
        lowered[index] -= eps
        numeric = (loss(bumped) - loss(lowered)) / (2 * eps)
        assert torch.isclose(texture.grad[index], numeric, rtol=1e-3, atol=1e-3), (index, texture.grad[index], numeric)
    assert texture.grad.abs().sum() > 0


def test_vertex_gradient_matches_finite_differences_inside_the_silhouette():
    # Moving a vertex slides the texture under interior pixels (through the barycentrics);
    # the pixels compared stay covered, so the loss is smooth there.
    mesh = textured_quad(texture_size=4)
    weights = torch.zeros(1, 32, 32, 3)
    weights[0, 10:22, 10:22] = torch.rand(12, 12, 3, generator=torch.Generator().manual_seed(2))

    def loss(vertices):
        rgb = render_mesh(MeshData(vertices, mesh.faces, uvs=mesh.uvs, face_uvs=mesh.face_uvs, texture=mesh.texture), front_camera(), 32)["rgb"]
        return (rgb * weights).sum()

    vertices = mesh.vertices.clone().requires_grad_(True)
    loss(vertices).backward()
    eps = 2e-3
    for vertex, axis in [(0, 1), (2, 2), (1, 2), (3, 1)]:
        up, down = mesh.vertices.clone(), mesh.vertices.clone()
        up[vertex, axis] += eps
        down[vertex, axis] -= eps
        numeric = (loss(up) - loss(down)) / (2 * eps)
        assert torch.isclose(vertices.grad[vertex, axis], numeric, rtol=0.05, atol=0.05), (vertex, axis, vertices.grad[vertex, axis], numeric)


def test_antialiased_silhouette_gradient_matches_finite_differences():
    # A tilted quad whose outline crosses pixels at every angle: with antialias=True the
    # covered share of each pixel, and so rgb and alpha at the silhouette, follow the vertices.
    vertices = torch.tensor([[0.0, -0.31, -0.27], [0.05, 0.33, -0.22], [0.0, 0.25, 0.36], [-0.03, -0.29, 0.3]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    colours = torch.rand(4, 3, generator=torch.Generator().manual_seed(4))
    weights = torch.rand(1, 32, 32, 4, generator=torch.Generator().manual_seed(5))

    def loss(v):
        out = render_mesh(MeshData(v, faces, vertex_colors=colours), front_camera(), 32, antialias=True)
        return (torch.cat([out["rgb"], out["alpha"]], dim=-1) * weights).sum()

    moved = vertices.clone().requires_grad_(True)
    loss(moved).backward()
    eps = 1e-3  # the antialiased render is continuous in the vertices, so differences may cross pixel centres
    for vertex, axis in [(0, 1), (0, 2), (1, 1), (2, 2), (3, 1), (1, 0)]:
        up, down = vertices.clone(), vertices.clone()
        up[vertex, axis] += eps
        down[vertex, axis] -= eps
        numeric = (loss(up) - loss(down)) / (2 * eps)
        assert torch.isclose(moved.grad[vertex, axis], numeric, rtol=0.02, atol=0.1), (vertex, axis, moved.grad[vertex, axis], numeric)


def test_antialiased_coverage_is_the_covered_area():
    # A square whose sides fall between pixel centres: the hard render counts whole pixels,
    # the antialiased one the area (up to the corners, which it blends along one axis only).
    side = 0.3  # world units; the image spans [-1, 1] at the quad's depth
    vertices = torch.tensor([[0.0, -side, -side], [0.0, side, -side], [0.0, side, side], [0.0, -side, side]]) + torch.tensor([0.0, 0.0137, 0.0])
    square = MeshData(vertices, torch.tensor([[0, 1, 2], [0, 2, 3]]), vertex_colors=torch.full((4, 3), 0.2))
    area = (side * 32) ** 2  # pixels
    hard = float(render_mesh(square, front_camera(), 32)["alpha"].sum())
    soft = float(render_mesh(square, front_camera(), 32, antialias=True)["alpha"].sum())
    assert abs(soft - area) < 1.0 < abs(hard - area), (soft, hard, area)


def flat_patch(n=5):
    """An n x n grid of vertices in the plane z = 0, two triangles a cell."""
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    vertices = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.zeros(n * n)], dim=-1) / (n - 1)
    corner = (torch.arange(n - 1)[:, None] * n + torch.arange(n - 1)[None, :]).reshape(-1)
    faces = torch.cat([torch.stack([corner, corner + 1, corner + n + 1], -1), torch.stack([corner, corner + n + 1, corner + n], -1)])
    return vertices, faces


def test_laplacian_of_displacements_is_zero_unmoved_and_positive_when_perturbed():
    vertices, faces = flat_patch()
    normals = torch.tensor([0.0, 0.0, 1.0]).expand_as(vertices)

    def smoothness(offsets):
        return float(uniform_laplacian(offsets[:, None] * normals, faces).square().sum(dim=1).mean())

    assert smoothness(torch.zeros(len(vertices))) == 0.0
    assert smoothness(torch.full((len(vertices),), 0.01)) < 1e-12  # a rigid shift is smooth
    bumped = torch.zeros(len(vertices))
    bumped[12] = 0.01  # the centre vertex
    assert smoothness(bumped) > 1e-6
    # the Laplacian itself: the centre vertex minus the mean of its six neighbours
    laplacian = uniform_laplacian(bumped[:, None], faces)
    assert torch.isclose(laplacian[12, 0], torch.tensor(0.01)) and torch.isclose(laplacian[13, 0], torch.tensor(-0.01 / 6))


def test_vertex_offsets_stay_bounded_and_bring_a_shrunken_mesh_back():
    """A crate shrunk by 5% refined against its truth: offsets within their bound, PSNR up."""
    truth = crate()
    start = replace(truth, vertices=truth.vertices * 0.95)
    camera_cfg = CameraConfig(distance=2.0, fovy=40.0, elevation_range=[0.0, 40.0])
    reference_camera = Cameras.make(10.0, 30.0, 2.0, 40.0)
    reference = render_mesh(truth, reference_camera, 48, ssaa=2)
    prior = ReferencePrior(truth, PriorConfig(), "cpu", seed=0)
    cfg = RefineConfig(steps=3, lr=0.002, resolution=48, supersampling=2, n_views=8, batch_size=2,
                       vertex_offsets=True, vertex_steps=20, max_offset=0.02, lr_vertices=0.002,
                       lambda_smooth=1e5)  # eight vertices: growing the box is itself far from a rigid shift
    refined, stats = refine_texture(start, prior, reference["rgb"], reference_camera, cfg, camera_cfg, prior_step=1200,
                                    reference_alpha=reference["alpha"])
    offsets = ((refined.vertices - start.vertices) ** 2).sum(dim=1).sqrt()
    assert float(offsets.max()) <= cfg.max_offset + 1e-6 and stats["refine_offset_max"] <= cfg.max_offset
    assert float(offsets.min()) > 0.0  # the outline moved
    assert stats["refine_vertex_mask_loss"] < stats["refine_vertex_mask_loss_first"]
    views = Cameras.make(30.0, [0.0, 90.0, 180.0, 270.0], 2.0, 40.0)
    truth_images = render_mesh(truth, views, 64, ssaa=2)["rgb"]
    before = psnr(render_mesh(start, views, 64, ssaa=2)["rgb"], truth_images)
    after = psnr(render_mesh(refined, views, 64, ssaa=2)["rgb"], truth_images)
    assert after > before + 0.5, (before, after)


def test_truth_sampling_gives_the_reference_prior_an_antialiased_truth_and_puts_it_back():
    """Within the block SDS pulls an antialiased render towards itself (no gradient); at one sample a pixel it does not."""
    truth = crate()
    camera = Cameras.make(20.0, 30.0, 2.0, 40.0)
    prior = ReferencePrior(truth, PriorConfig(), "cpu", seed=0)

    def sds_gradient() -> torch.Tensor:
        image = render_mesh(truth, camera, 24, ssaa=2)["rgb"].requires_grad_(True)
        prior.sds_loss(image, camera, step=1200)["loss_sds"].backward()
        return image.grad.abs()

    with truth_sampling(prior, 2):
        assert prior.ssaa == 2
        assert float(sds_gradient().max()) < 1e-4
    assert prior.ssaa == 1
    assert float(sds_gradient().max()) > 1e-2  # the outline differs from the stair-stepped truth
    other = object()  # a prior without a rendered truth (Zero123) is left alone
    with truth_sampling(other, 2):
        assert not hasattr(other, "ssaa")


def test_fixed_geometry_renders_match_render_mesh_and_its_gradient():
    mesh = textured_quad()
    cameras = Cameras.make([0.0, 20.0], [0.0, 30.0], 2.0, 40.0)
    views = texel_views(mesh, cameras, 32, ssaa=2)
    background = torch.ones(3)
    texture = mesh.texture.clone().requires_grad_(True)
    fast = render_texture(views, texture, background)
    reference = render_mesh(MeshData(mesh.vertices, mesh.faces, uvs=mesh.uvs, face_uvs=mesh.face_uvs, texture=texture), cameras, 32, ssaa=2, uv_wrap="clamp")["rgb"]
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    weights = torch.rand(fast.shape, generator=torch.Generator().manual_seed(3))
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), texture)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), texture)
    torch.testing.assert_close(grad_fast, grad_reference, atol=1e-5, rtol=1e-4)
    # one view picked out of the set renders as that view alone
    torch.testing.assert_close(render_texture(views, texture, background, torch.tensor([1])), fast[1:2])


def test_refinement_brings_the_mesh_closer_to_the_truth(tmp_path):
    """A short self-check: refinement raises mesh PSNR, and the geometry (so the silhouette) is untouched."""
    mesh_path = save_obj(crate(), tmp_path / "crate")
    settings = [
        "fit.steps=40", "camera.resolutions=[48]", "camera.reference_resolution=64", "fit.reference_rays=512",
        "render.n_samples_per_ray=64", "extract.resolution=64", "extract.carve_views_resolution=64", "texture.size=128",
        "export.preview=false", "eval.n_views=4", "eval.resolution=96", "eval.n_surface_points=4000", "eval.iou_resolution=32",
        "refine.steps=40", "refine.n_views=12", "refine.resolution=64", "refine.supersampling=2",
        "refine.vertex_offsets=false",  # the texture-only path: the geometry must come out unchanged
    ]
    assert main(["--reference-mesh", str(mesh_path), "--config", "cpu", "--output", str(tmp_path / "run"), "--quiet", *settings]) == 0
    scores = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert scores["psnr"] > scores["psnr_before_refine"] + 0.3, scores
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["refine"]["ran"] and record["refine"]["settings"]["steps"] == 40
    assert record["refine"]["refine_rgb_loss"] < record["refine"]["refine_rgb_loss_first"]
    assert "refine" in scores["stage_seconds"]

    # Refinement changes the texture only: exported again without it, the geometry is the same.
    before = (tmp_path / "run" / "model.obj").read_text().split("vt ")[0]
    assert main(["--export-only", str(tmp_path / "run"), "refine.steps=0", "--quiet"]) == 0
    assert (tmp_path / "run" / "model.obj").read_text().split("vt ")[0] == before
    assert json.loads((tmp_path / "run" / "run.json").read_text())["refine"]["ran"] is False
