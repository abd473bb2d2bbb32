"""Pictures of a known mesh: the photo a scored run starts from, and the views it is scored on.

The evaluation follows the SyncDreamer protocol's cameras (docs/design.md,
"Evaluation"): ``eval.n_views`` views at elevation ``eval.elevation``, azimuth
from 0 in equal steps, distance ``eval.distance``, field of view ``eval.fovy``,
``eval.resolution`` pixels a side, unlit albedo over white. The photo of a
scored run (the self-check, the benchmark) is taken with the same camera at
the input's elevation, azimuth 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from recon.camera import Cameras, orbit_cameras
from recon.config import Config, EvalConfig
from recon.frames import PhotoCamera
from recon.mesh.data import MeshData
from recon.mesh.texture import vertex_normals
from recon.render.mesh_raster import AMBIENT, GREY, render_mesh

# A fixed light for truths without appearance: from the photo's side (+x) and above.
TRUTH_LIGHT = (1.0, 0.0, 0.5)

# The protocol's renders (Blender) are anti-aliased; hard pixel edges would bias PSNR/SSIM at silhouettes.
SSAA = 2


def with_albedo(mesh: MeshData) -> MeshData:
    """``mesh``, or, when it has no texture or vertex colours, the plain grey lit by a fixed light, as vertex colours.

    The mesh renderer draws a mesh without appearance under a headlight, which
    depends on the view; a reconstruction (a view-independent albedo) cannot
    match that, and the field fakes it with a dark skin that the bake reads.
    Fixed shading keeps the shape cue and is a true albedo.
    """
    if mesh.has_texture or mesh.vertex_colors is not None:
        return mesh
    light = torch.nn.functional.normalize(torch.tensor(TRUTH_LIGHT, device=mesh.device), dim=0)
    wrap = 0.5 * (1.0 + vertex_normals(mesh) @ light)  # 1 facing the light, 0 facing away
    shade = GREY * (AMBIENT + (1.0 - AMBIENT) * wrap)
    return replace(mesh, vertex_colors=shade[:, None].expand(-1, 3).contiguous())


def eval_cameras(cfg: EvalConfig, device=None) -> Cameras:
    """The views a reconstruction is scored on, in the truth's frame."""
    return orbit_cameras(cfg.n_views, cfg.elevation, cfg.distance, cfg.fovy, device=device)


def photo_camera(cfg: Config) -> PhotoCamera:
    """The camera of a scored run's photo: the protocol's, at the input elevation (``camera.reference_elevation``)."""
    return PhotoCamera(cfg.camera.reference_elevation, cfg.eval.distance, cfg.eval.fovy, cfg.eval.resolution, cfg.eval.resolution)


def render_photo(mesh: MeshData, photo: PhotoCamera) -> torch.Tensor:
    """The photo [H, W, 4] of ``mesh`` as straight-alpha RGBA in [0, 1] (anti-aliased, unlit albedo), on the CPU."""
    camera = Cameras.make(photo.elevation, 0.0, photo.distance, photo.fovy, device=mesh.device)
    # Over black the composited colour is premultiplied by coverage; dividing by
    # alpha recovers the straight colour along anti-aliased edges.
    out = render_mesh(mesh, camera, photo.height, photo.width, background=(0.0, 0.0, 0.0), shading="albedo", ssaa=SSAA)
    alpha = out["alpha"][0]
    colour = torch.where(alpha > 0, out["rgb"][0] / alpha.clamp(min=1e-6), torch.zeros_like(out["rgb"][0]))
    return torch.cat([colour.clamp(0.0, 1.0), alpha], dim=-1).cpu()


def truth_views(mesh: MeshData, cfg: EvalConfig, background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """The mesh from every evaluation camera [n_views, H, W, 3], over ``background``, anti-aliased."""
    out = render_mesh(mesh, eval_cameras(cfg, mesh.device), cfg.resolution, background=tuple(background), shading="albedo", ssaa=SSAA)
    return out["rgb"].clamp(0.0, 1.0)
