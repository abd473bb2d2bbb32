"""The product's own path scored against truth: frames, the image path end to end, --score, and glTF both ways."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from recon import pipeline
from recon.bench.procedural import OBJECTS, vase
from recon.camera import Cameras, project
from recon.cli import main
from recon.config import Config, EvalConfig, load_config
from recon.eval.score import geometry_scores
from recon.eval.truth import photo_camera, render_photo, with_albedo
from recon.frames import PhotoCamera, Recentring, Similarity, fit_to_photo_world
from recon.io_utils import save_rgba_png
from recon.mesh.data import MeshData, normalize_to_unit_cube
from recon.mesh.export import export_asset
from recon.mesh.io import load_mesh
from recon.prepare import prepare_reference
from recon.render.mesh_raster import render_mesh
from recon.run_record import new_record

# The engine's bounds on a scored reconstruction.
MAX_CHAMFER = 0.015
MIN_VOLUME_IOU = 0.75
MIN_MESH_PSNR = 23.0


def prepared(truth: MeshData, camera: PhotoCamera, cfg: Config):
    """The photo of ``truth`` taken by ``camera``, prepared as a run prepares it."""
    rgba = render_photo(truth, camera)
    image = Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), "RGBA")
    return prepare_reference(image, np.asarray(image.getchannel("A")) >= 128, cfg.prepare.border_ratio, cfg.prepare.size)


def unit_cube() -> MeshData:
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    return MeshData(torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces))


# ----------------------------------------------------------------------------- frames


def test_the_map_is_the_identity_when_the_photo_is_the_fit_view():
    camera = PhotoCamera(20.0, 2.0, 40.0, 256, 256)
    same = fit_to_photo_world(Recentring(1.0, 0.0, 0.0, 256), camera, 2.0, 40.0)
    assert same.scale == pytest.approx(1.0)
    torch.testing.assert_close(same.rotation, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(same.translation, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    # a crop that doubles the object: the fit frame holds it twice as large
    zoomed = fit_to_photo_world(Recentring(2.0, -128.0, -128.0, 256), camera, 2.0, 40.0)
    assert zoomed.scale == pytest.approx(0.5)


def test_a_mesh_mapped_through_the_image_path_frames_and_back_scores_zero_against_itself():
    cfg = load_config("cpu", ["camera.reference_elevation=30"])
    truth = normalize_to_unit_cube(OBJECTS["crate"]())[0]
    camera = photo_camera(cfg)
    view = prepared(truth, camera, cfg)
    assert abs(view.recentring.scale - 1.0) > 0.05  # the recentring really rescaled the photo
    fit_to_world = fit_to_photo_world(view.recentring, camera, cfg.camera.distance, cfg.camera.fovy)
    in_fit = truth.with_vertices(fit_to_world.inverse().apply(truth.vertices))
    back = in_fit.with_vertices(fit_to_world.apply(in_fit.vertices))
    scores = geometry_scores(back, truth, cfg.eval, "recon")
    assert scores["chamfer"] < 1e-3 and scores["volume_iou"] > 0.999
    # the record's copy of the map is the same map
    again = Similarity.from_dict(json.loads(json.dumps(fit_to_world.to_dict())))
    torch.testing.assert_close(again.apply(in_fit.vertices), back.vertices)


@pytest.mark.parametrize("name", ["vase", "torus", "crate", "pebble"])
def test_the_fit_view_of_the_mapped_truth_matches_the_prepared_photo(name):
    """The map is weak perspective: measure how far apart the two pictures of each vertex land (docs/design.md)."""
    cfg = load_config("cpu", ["camera.reference_elevation=30"])
    truth = normalize_to_unit_cube(OBJECTS[name]())[0]
    camera = photo_camera(cfg)
    view = prepared(truth, camera, cfg)
    fit_to_world = fit_to_photo_world(view.recentring, camera, cfg.camera.distance, cfg.camera.fovy)
    in_photo, _ = project(truth.vertices, Cameras.make(camera.elevation, 0.0, camera.distance, camera.fovy), camera.height, camera.width)
    in_fit, _ = project(fit_to_world.inverse().apply(truth.vertices), Cameras.make(camera.elevation, 0.0, cfg.camera.distance, cfg.camera.fovy), cfg.prepare.size)
    error = (view.recentring.apply(in_photo[0]) - in_fit[0]).norm(dim=-1)
    assert error.mean() < 5.0 and error.max() < 8.0  # pixels of the 256-pixel prepared view


# ----------------------------------------------------------------------------- the image path, scored

QUICK = ["export.preview=false", "camera.reference_elevation=30"]


def scored_run(tmp_path, told_elevation):
    """The vase photographed at elevation 30, reconstructed through the image path told ``told_elevation``."""
    truth = normalize_to_unit_cube(vase())[0]
    photo_cfg = load_config("cpu", QUICK + ["prior.kind=reference"])
    run_dir = tmp_path / f"told-{told_elevation:g}"
    run_dir.mkdir()
    save_rgba_png(run_dir / pipeline.PHOTO_IMAGE, render_photo(truth, photo_camera(photo_cfg)))
    cfg = load_config("cpu", QUICK + ["prior.kind=reference", f"camera.reference_elevation={told_elevation}"])
    record = new_record(run_dir, cfg, mode="reference-mesh")
    result = pipeline.reconstruct(run_dir / pipeline.PHOTO_IMAGE, cfg, run_dir, record, truth=truth, camera=photo_camera(cfg), check_safety=False, quiet=True)
    return result.metrics, json.loads((run_dir / "run.json").read_text())


def within_bounds(metrics) -> bool:
    return metrics["chamfer"] <= MAX_CHAMFER and metrics["volume_iou"] >= MIN_VOLUME_IOU and metrics["psnr"] >= MIN_MESH_PSNR


def test_a_photo_reconstructs_within_the_bounds_and_the_wrong_elevation_does_not(tmp_path):
    right, record = scored_run(tmp_path, 30.0)
    assert within_bounds(right), right
    assert record["status"] == "ok" and record["safety"]["checked"] is False
    assert abs(record["frames"]["recentring"]["scale"] - 1.0) > 0.05  # the photo was rescaled by prepare
    wrong, _ = scored_run(tmp_path, 0.0)
    assert not within_bounds(wrong), wrong


# ----------------------------------------------------------------------------- --score


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def cube_files(tmp_path):
    cube = unit_cube()
    trimesh.Trimesh(cube.vertices.numpy(), cube.faces.numpy()).export(tmp_path / "cube.ply")
    trimesh.Trimesh(cube.vertices.numpy() + np.array([0.05, 0.0, 0.0]), cube.faces.numpy()).export(tmp_path / "shifted.ply")
    return tmp_path / "cube.ply", tmp_path / "shifted.ply"


@pytest.mark.parametrize("protocol", ["recon", "syncdreamer"])
def test_score_of_a_mesh_against_itself(cube_files, tmp_path, capsys, protocol):
    cube, _ = cube_files
    out = tmp_path / f"self-{protocol}.json"
    assert run("--score", cube, "--truth", cube, "--protocol", protocol, "--output", out) == 0
    written = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == written
    assert written["chamfer"] == 0.0 and written["volume_iou"] == 1.0 and written["protocol"] == protocol


def test_score_of_a_shifted_copy_matches_the_value_derived_by_hand(cube_files, tmp_path):
    """The unit cube against itself moved by d = 0.05 along x.

    Chamfer, per direction (both are equal by symmetry), averaged over the six
    faces of the sampled cube: its outer x face is d from the other's (d); its
    inner x face, inside the other cube, is min(d, 0.5 - |y|, 0.5 - |z|) away,
    whose mean over the face is (1 - (1 - 2d)^3) / 6; its four side faces lie
    in the other's planes except a strip of width d, at mean distance d / 2
    (d^2 / 2 a face). Sampled with n points over area 6, the points at zero
    distance (area 4 (1 - d)) find their nearest sample at the mean distance
    of a planar Poisson process, 1 / (2 sqrt(n / 6)).

    Volume IoU, recon protocol: voxel centres -0.55 + (k + 1/2) 1.1/64 inside
    [-0.5, 0.5] are k = 3..60 and inside [-0.45, 0.55] k = 6..63: 55 / 61.
    SyncDreamer protocol: nodes -1 + i/32 in [-0.5, 0.5) are i = 16..47 and in
    [-0.45, 0.55] i = 18..49 (32 each way along y and z): 30 / 34. The truth's
    faces lie on grid nodes (its longest side always spans [-0.5, 0.5]), where
    the inside test is decided by floating-point ties, as in mesh2sdf: the few
    corner nodes that fall either way move the fourth decimal.
    """
    cube, shifted = cube_files
    d, n = 0.05, 200000
    expected = (d + (1 - (1 - 2 * d) ** 3) / 6 + 4 * d * d / 2) / 6 + (4 * (1 - d) / 6) / (2 * math.sqrt(n / 6))
    assert run("--score", shifted, "--truth", cube, "--output", tmp_path / "recon.json", f"eval.n_surface_points={n}") == 0
    scores = json.loads((tmp_path / "recon.json").read_text())
    assert scores["chamfer"] == pytest.approx(expected, rel=0.02)
    assert scores["volume_iou"] == pytest.approx(55 / 61, abs=1e-9)
    assert run("--score", shifted, "--truth", cube, "--protocol", "syncdreamer", "--output", tmp_path / "sync.json") == 0
    assert json.loads((tmp_path / "sync.json").read_text())["volume_iou"] == pytest.approx(30 / 34, abs=1e-3)


def test_score_needs_a_truth(cube_files, capsys):
    assert run("--score", cube_files[0]) == 2
    assert "--truth" in capsys.readouterr().err


# ----------------------------------------------------------------------------- glTF both ways


def test_exported_assets_load_back_unrotated(tmp_path):
    mesh = normalize_to_unit_cube(OBJECTS["crate"]())[0]
    paths = export_asset(mesh, tmp_path, formats=("glb", "obj"))
    for kind in ("glb", "obj"):
        loaded = load_mesh(paths[kind])
        assert loaded.has_texture
        # the same surface in recon's frame: the crate is longest along x, shortest along z
        np.testing.assert_allclose(loaded.vertices.min(0).values.numpy(), mesh.vertices.min(0).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(loaded.vertices.max(0).values.numpy(), mesh.vertices.max(0).values.numpy(), atol=1e-5)
        scores = geometry_scores(loaded, mesh, EvalConfig(n_surface_points=5000), "recon")
        assert scores["chamfer"] < 0.01 and scores["volume_iou"] > 0.99


def test_a_colourless_truth_looks_the_same_from_every_view():
    # The renderer lights a mesh without colours from the camera; a fitted
    # albedo cannot reproduce light that moves with the view, so scored runs
    # give such a truth fixed colours. A point seen from two cameras keeps its colour.
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    plain = MeshData(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces))
    cameras = Cameras.make(0.0, [0.0, 60.0], 1.5, 49.1)
    facing_first = cameras.c2w[0, :3, 3] / cameras.c2w[0, :3, 3].norm() * 0.4
    point = plain.vertices[(plain.vertices - facing_first).norm(dim=1).argmin()]
    pixels, _ = project(point[None], cameras, 128)

    def colours_at_point(mesh):
        rgb = render_mesh(mesh, cameras, 128, shading="albedo")["rgb"]
        return [float(rgb[i, int(pixels[i, 0, 1]), int(pixels[i, 0, 0])].mean()) for i in range(2)]

    lit = colours_at_point(plain)
    assert abs(lit[0] - lit[1]) > 0.05  # the headlight: brighter where the view is head-on
    fixed = colours_at_point(with_albedo(plain))
    assert abs(fixed[0] - fixed[1]) < 0.01
    coloured = MeshData(plain.vertices, plain.faces, vertex_colors=torch.full_like(plain.vertices, 0.3))
    assert with_albedo(coloured) is coloured  # a truth with its own colours is left alone

