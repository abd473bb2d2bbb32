"""Texture refinement: the rasteriser's gradients against finite differences, the fixed-geometry
renderer against render_mesh, and a fitted object whose mesh gets closer to the truth."""

from __future__ import annotations

import json
import math

import torch

from recon.bench.procedural import crate, save_obj
from recon.camera import Cameras
from recon.cli import main
from recon.mesh.data import MeshData
from recon.mesh.refine import render_texture, texel_views
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
