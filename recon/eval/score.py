"""Scores of a mesh against the truth under a named protocol (docs/design.md, "Evaluation").

Both meshes must be in one frame: the truth normalised to the unit cube
(bounding box centred, longest side 1; both protocols normalise this way) and
the prediction already mapped into it. Two protocols:

* ``recon`` (our bounds): Chamfer distance and F-score between
  ``eval.n_surface_points`` area-weighted samples of each surface; volume IoU
  of the voxel centres of a ``eval.iou_resolution``^3 grid over
  [-0.55, 0.55]^3, inside by a majority vote of ray parity along x, y and z
  (robust to small holes).
* ``syncdreamer`` (SyncDreamer's ``eval_mesh.py``, to compare with published
  rows): points back-projected from the depth maps of each mesh in the
  ``eval.n_views`` evaluation views at ``eval.resolution``, voxel-downsampled
  at 0.01; Chamfer as the mean of both directions' mean nearest distances;
  volume IoU of the grid points ``-1 + 2 i / R``, ``i < R = eval.iou_resolution``
  (mesh2sdf's grid over [-1, 1]^3), inside where the SDF is negative, i.e. by
  the parity of crossings along x (SDFGen's sign rule). Two deliberate
  differences: pixels are back-projected through their centres (the original
  uses the pixel corner after rasterising at the centre) and depth is
  interpolated perspective-correctly.

Image scores (PSNR, SSIM, LPIPS) are over the evaluation views, 256x256 over
white, the same under both protocols.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from recon.camera import generate_rays
from recon.config import EvalConfig
from recon.errors import BadInput
from recon.eval import metrics
from recon.eval.truth import eval_cameras, truth_views
from recon.mesh.data import MeshData
from recon.render.mesh_raster import render_mesh

PROTOCOLS = ("recon", "syncdreamer")
SYNCDREAMER_VOXEL = 0.01  # voxel size of the depth point clouds' downsampling


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise BadInput(f"unknown evaluation protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")
    return protocol


def depth_points(mesh: MeshData, cfg: EvalConfig, voxel: float = SYNCDREAMER_VOXEL) -> np.ndarray:
    """The surface as the evaluation views' depth maps see it: covered pixels back-projected, downsampled, [M, 3]."""
    cameras = eval_cameras(cfg, mesh.device)
    out = render_mesh(mesh, cameras, cfg.resolution)
    origins, directions = generate_rays(cameras, cfg.resolution)
    forward = -cameras.c2w[:, None, None, :3, 2]  # the viewing axis: depth is measured along it
    distance = out["depth"] / (directions * forward).sum(dim=-1)
    points = (origins + directions * distance[..., None])[out["face_id"] >= 0]
    return metrics.voxel_downsample(points.double().cpu().numpy(), voxel)


def syncdreamer_grid(resolution: int) -> np.ndarray:
    """mesh2sdf's sample coordinates along each axis: ``-1 + 2 i / resolution``."""
    return -1.0 + 2.0 * np.arange(resolution) / resolution


def geometry_scores(pred: MeshData, truth: MeshData, cfg: EvalConfig, protocol: str = "recon", seed: int = 0) -> Dict[str, float]:
    """Chamfer distance, volume IoU and F-score (at ``eval.fscore_threshold``) of ``pred`` against ``truth``."""
    check_protocol(protocol)
    pred, truth = pred.to("cpu"), truth.to("cpu")
    if protocol == "recon":
        # The same random numbers for both meshes: identical meshes get identical points (Chamfer 0).
        points_pred = metrics.sample_surface(pred, cfg.n_surface_points, seed=seed)
        points_truth = metrics.sample_surface(truth, cfg.n_surface_points, seed=seed)
        volume = metrics.volume_iou(pred, truth, resolution=cfg.iou_resolution)
    else:
        points_pred, points_truth = depth_points(pred, cfg), depth_points(truth, cfg)
        if len(points_pred) == 0 or len(points_truth) == 0:
            raise BadInput("a mesh is not visible in any evaluation view; it cannot be scored under the syncdreamer protocol")
        grid = syncdreamer_grid(cfg.iou_resolution)
        volume = metrics.iou(metrics.inside_along_x(pred, grid), metrics.inside_along_x(truth, grid))
    return {
        "chamfer": metrics.chamfer_distance(points_pred, points_truth),
        "volume_iou": volume,
        "fscore": metrics.fscore(points_pred, points_truth, cfg.fscore_threshold),
    }


def image_scores(views: torch.Tensor, truth: torch.Tensor) -> Dict[str, Optional[float]]:
    """PSNR, SSIM and LPIPS (None where unavailable) of views [N, H, W, 3] against the truth's."""
    return metrics.image_metrics(views, truth)


def mesh_views(mesh: MeshData, cfg: EvalConfig, background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """A coloured mesh from every evaluation camera, rendered exactly as the truth is."""
    return truth_views(mesh, cfg, background)


def score_meshes(pred: MeshData, truth: MeshData, cfg: EvalConfig, protocol: str = "recon", seed: int = 0) -> Dict[str, Optional[float]]:
    """Geometry scores, plus image scores when both meshes carry colour (``--score``)."""
    scores: Dict[str, Optional[float]] = dict(geometry_scores(pred, truth, cfg, protocol, seed))
    coloured = all(m.has_texture or m.vertex_colors is not None for m in (pred, truth))
    if coloured:
        scores.update(image_scores(mesh_views(pred, cfg), mesh_views(truth, cfg)))
    return scores


def score_reconstruction(
    mesh: MeshData, field_images: torch.Tensor, truth: MeshData, truth_images: torch.Tensor, cfg: EvalConfig, protocol: str = "recon", seed: int = 0
) -> Dict[str, Optional[float]]:
    """A reconstruction's scores: the exported mesh's geometry and images, and the field's images (``field_*``).

    ``mesh`` is already in the truth's frame; ``field_images`` and
    ``truth_images`` [n_views, H, W, 3] are the field's and the truth's
    renders from the evaluation cameras.
    """
    scores: Dict[str, Optional[float]] = dict(geometry_scores(mesh, truth, cfg, protocol, seed))
    scores.update(image_scores(mesh_views(mesh.to(truth_images.device), cfg), truth_images))  # the asset users get
    scores.update({f"field_{name}": value for name, value in image_scores(field_images, truth_images).items()})
    scores["protocol"] = protocol
    return scores
