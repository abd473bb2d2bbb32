"""Geometry and image metrics: the primitives that :mod:`recon.eval.score` combines into protocols.

Geometry (numpy / scipy, float64, on the CPU):

* Chamfer distance: mean of both directions of non-squared nearest-neighbour
  distances between area-weighted surface samples, ``(mean_a + mean_b) / 2``.
* F-score at a distance threshold (harmonic mean of precision and recall).
* Volume IoU of the two solids on a ``resolution^3`` grid of voxel centres.

None of these renormalise: both meshes must already be in the same frame
(for GSO, the truth normalised with :func:`recon.mesh.data.normalize_to_unit_cube`
and the reconstruction mapped into its frame). Chamfer and F-score thresholds are in that
frame's units.

Images ([N, H, W, 3] or [H, W, 3], floats in [0, 1], numpy or torch): PSNR,
SSIM (11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03) and LPIPS, each
the mean over the images. LPIPS needs the ``lpips`` package and its backbone
weights on disk; without them it is reported as ``None``, never downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree

from recon.mesh.data import MeshData

# Half side of the volume-IoU grid. Unit-cube meshes span [-0.5, 0.5]; the 10%
# margin keeps a prediction that overshoots the unit cube slightly (an
# un-renormalised reconstruction) from being clipped at the grid's border.
IOU_BOUND = 0.55

# PSNR of a pixel-perfect image would be infinite; clamping the MSE keeps a
# mean over images finite (an identical image scores 100 dB).
_MIN_MSE = 1e-10


def _numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _triangles(mesh: MeshData) -> np.ndarray:
    """Vertex positions of each face, [F, 3 corners, 3] float64."""
    return _numpy(mesh.vertices)[_numpy(mesh.faces).astype(np.int64)]


# ----------------------------------------------------------------------------- geometry


def sample_surface(mesh: MeshData, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points [n, 3] (float64) uniformly distributed over the surface area."""
    triangles = _triangles(mesh)
    areas = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=-1)
    if len(triangles) == 0 or areas.sum() <= 0.0:
        raise ValueError("cannot sample the surface of a mesh without area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(triangles), size=n, p=areas / areas.sum())
    # Uniform barycentrics: fold the unit square onto the triangle u + v <= 1.
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1.0
    u, v = np.where(flip, 1.0 - u, u), np.where(flip, 1.0 - v, v)
    a, b, c = triangles[face, 0], triangles[face, 1], triangles[face, 2]
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def _nearest_distances(points_from: np.ndarray, points_to: np.ndarray) -> np.ndarray:
    distances, _ = cKDTree(points_to).query(points_from, k=1, workers=-1)
    return distances


def chamfer_distance(points_a, points_b) -> float:
    """``(mean_a + mean_b) / 2`` of non-squared nearest-neighbour distances."""
    a, b = _numpy(points_a), _numpy(points_b)
    return float(0.5 * (_nearest_distances(a, b).mean() + _nearest_distances(b, a).mean()))


def fscore(points_a, points_b, threshold: float) -> float:
    """F-score at ``threshold``: precision of ``points_a`` (prediction) against ``points_b`` (truth) and recall."""
    a, b = _numpy(points_a), _numpy(points_b)
    precision = float((_nearest_distances(a, b) < threshold).mean())
    recall = float((_nearest_distances(b, a) < threshold).mean())
    if precision + recall == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def voxel_centres(resolution: int, bound: float = IOU_BOUND) -> np.ndarray:
    """Coordinates [resolution] of the voxel centres along one axis of the grid over ``[-bound, bound]``."""
    size = 2.0 * bound / resolution
    return -bound + (np.arange(resolution) + 0.5) * size


def _parity_along(triangles: np.ndarray, axis: int, centres: np.ndarray, max_pairs: int) -> np.ndarray:
    """Inside test by ray parity: rays along ``axis`` through every column of the grid ``centres`` [R]^3.

    ``centres`` are the (uniformly spaced) sample coordinates along each axis.
    A sample is inside when an odd number of triangle crossings lie beyond it
    along the ray. Returns a bool grid indexed [x, y, z].
    """
    u_axis, v_axis = [a for a in range(3) if a != axis]
    resolution = len(centres)
    size = float(centres[1] - centres[0])
    # Move the rays off the grid lines by a tiny amount: axis-aligned meshes
    # (cubes, boxes) would otherwise put rays exactly on shared edges, where
    # the crossing would be counted twice or not at all.
    jitter_u, jitter_v = 1.37e-4 * size, 0.71e-4 * size
    first_u, first_v = centres[0] + jitter_u, centres[0] + jitter_v

    pu, pv, pw = triangles[..., u_axis], triangles[..., v_axis], triangles[..., axis]  # [F, 3] each
    area2 = (pu[:, 1] - pu[:, 0]) * (pv[:, 2] - pv[:, 0]) - (pu[:, 2] - pu[:, 0]) * (pv[:, 1] - pv[:, 0])
    keep = np.abs(area2) > 1e-20  # faces seen edge-on along the ray cannot be crossed
    pu, pv, pw, area2 = pu[keep], pv[keep], pw[keep], area2[keep]

    # Grid columns covered by each face's projected bounding box.
    i0 = np.clip(np.ceil((pu.min(1) - first_u) / size), 0, resolution).astype(np.int64)
    i1 = np.clip(np.floor((pu.max(1) - first_u) / size), -1, resolution - 1).astype(np.int64)
    j0 = np.clip(np.ceil((pv.min(1) - first_v) / size), 0, resolution).astype(np.int64)
    j1 = np.clip(np.floor((pv.max(1) - first_v) / size), -1, resolution - 1).astype(np.int64)
    n_i, n_j = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
    pairs_per_face = n_i * n_j

    # Crossings per (column, slot): slot k means the crossing lies above the
    # centres of voxels 0..k-1 of that column.
    histogram = np.zeros(resolution * resolution * (resolution + 1), dtype=np.int64)
    # Process faces in chunks that bound the number of (face, column) pairs in memory.
    cumulative = np.cumsum(pairs_per_face)
    cuts = np.searchsorted(cumulative, np.arange(max_pairs, cumulative[-1] if len(cumulative) else 0, max_pairs), side="right")
    for start, stop in zip(np.r_[0, cuts], np.r_[cuts, len(pairs_per_face)]):
        counts = pairs_per_face[start:stop]
        if counts.sum() == 0:
            continue
        face = np.repeat(np.arange(start, stop), counts)
        local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        i = i0[face] + local // n_j[face]
        j = j0[face] + local % n_j[face]
        ru, rv = first_u + i * size, first_v + j * size

        # Barycentric coordinates of the ray in the projected triangle.
        u, v = pu[face], pv[face]
        b0 = ((u[:, 1] - ru) * (v[:, 2] - rv) - (u[:, 2] - ru) * (v[:, 1] - rv)) / area2[face]
        b1 = ((u[:, 2] - ru) * (v[:, 0] - rv) - (u[:, 0] - ru) * (v[:, 2] - rv)) / area2[face]
        b2 = 1.0 - b0 - b1
        hit = (b0 >= 0.0) & (b1 >= 0.0) & (b2 >= 0.0)
        w = pw[face[hit]]
        depth = b0[hit] * w[:, 0] + b1[hit] * w[:, 1] + b2[hit] * w[:, 2]
        slot = np.searchsorted(centres, depth, side="left")
        column = i[hit] * resolution + j[hit]
        histogram += np.bincount(column * (resolution + 1) + slot, minlength=histogram.size)

    histogram = histogram.reshape(resolution, resolution, resolution + 1)
    # Crossings beyond voxel k = crossings in slots k+1..R.
    beyond = histogram[..., ::-1].cumsum(axis=-1)[..., ::-1][..., 1:]
    inside = beyond % 2 == 1  # indexed [u, v, w]
    order = np.argsort([u_axis, v_axis, axis])
    return inside.transpose(order)


def occupancy_grid(mesh: MeshData, resolution: int = 64, bound: float = IOU_BOUND, max_pairs: int = 4_000_000) -> np.ndarray:
    """Which voxel centres of the ``resolution^3`` grid over ``[-bound, bound]^3`` lie inside the mesh.

    Bool array indexed [x, y, z], voxel ``k`` centred at ``voxel_centres(resolution, bound)[k]``.
    Exact for watertight meshes; for slightly open ones each axis' ray-parity
    vote can go wrong along the rays that slip through a hole, so the three
    axes vote and the majority wins.
    """
    triangles = _triangles(mesh)
    centres = voxel_centres(resolution, bound)
    votes = sum(_parity_along(triangles, axis, centres, max_pairs).astype(np.int8) for axis in range(3))
    return votes >= 2


def inside_along_x(mesh: MeshData, coordinates: np.ndarray, max_pairs: int = 4_000_000) -> np.ndarray:
    """Which points of the grid ``coordinates`` [R]^3 lie inside the mesh, by the parity of crossings along x only.

    The sign rule of SDFGen's ``make_level_set3`` (which mesh2sdf, and so
    SyncDreamer's volume IoU, uses). Bool array indexed [x, y, z].
    """
    return _parity_along(_triangles(mesh), 0, np.asarray(coordinates, dtype=np.float64), max_pairs)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool grids (0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def voxel_downsample(points: np.ndarray, voxel: float) -> np.ndarray:
    """The mean of the points [N, 3] in each occupied voxel of side ``voxel``: [M, 3].

    The voxels are open3d's ``voxel_down_sample`` grid: aligned to the cloud's
    minimum corner less half a voxel.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return points.reshape(0, 3)
    keys = np.floor((points - (points.min(axis=0) - 0.5 * voxel)) / voxel).astype(np.int64)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    counts = np.bincount(group)
    return np.stack([np.bincount(group, weights=points[:, axis]) for axis in range(3)], axis=1) / counts[:, None]


def volume_iou(mesh_a: MeshData, mesh_b: MeshData, resolution: int = 64, bound: float = IOU_BOUND) -> float:
    """Intersection over union of the two solids' occupancy grids (see :func:`occupancy_grid`)."""
    return iou(occupancy_grid(mesh_a, resolution, bound), occupancy_grid(mesh_b, resolution, bound))


# ----------------------------------------------------------------------------- images


def _images(array) -> torch.Tensor:
    """[N, H, W, 3] float64 tensor from [N, H, W, 3] or [H, W, 3], numpy or torch."""
    images = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    images = images.to(torch.float64)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3] or [H, W, 3], got {tuple(images.shape)}")
    return images


def _pair(pred, gt) -> Tuple[torch.Tensor, torch.Tensor]:
    pred, gt = _images(pred), _images(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    return pred, gt


def psnr(pred, gt) -> float:
    """Mean over images of each image's PSNR (peak 1, MSE over all pixels and channels)."""
    pred, gt = _pair(pred, gt)
    mse = ((pred - gt) ** 2).mean(dim=(1, 2, 3)).clamp_min(_MIN_MSE)
    return float((-10.0 * torch.log10(mse)).mean())


def _gaussian_band(length: int, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[length, length - size + 1] matrix whose column k is the normalised Gaussian window at k.

    ``x @ band`` is the 'valid' Gaussian filtering of ``x`` along its last axis:
    one BLAS matrix product, many times faster on a CPU than a float64 convolution.
    """
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    window = window / window.sum()
    positions = torch.arange(length - size + 1)
    band = torch.zeros(length, length - size + 1, dtype=torch.float64)
    band[positions[:, None] + torch.arange(size)[None, :], positions[:, None]] = window
    return band


def ssim(pred, gt) -> float:
    """Mean SSIM (Wang et al. 2004) over images and channels, data range 1.

    Local statistics use an 11x11 Gaussian window (sigma 1.5) with population
    (not sample) covariances, over the window positions that lie wholly inside
    the image; this matches ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``.
    """
    pred, gt = _pair(pred, gt)
    c1, c2 = 0.01**2, 0.03**2
    n, h, w, c = pred.shape
    if min(h, w) < 11:
        raise ValueError("SSIM needs images of at least 11x11 pixels")
    x = pred.permute(0, 3, 1, 2)  # [N, C, H, W]
    y = gt.permute(0, 3, 1, 2)
    # The five local moments in one batch; the Gaussian is separable: filter rows, then columns.
    moments = torch.stack([x, y, x * x, y * y, x * y])  # [5, N, C, H, W]
    moments = _gaussian_band(h).T @ (moments @ _gaussian_band(w))
    mu_x, mu_y, xx, yy, xy = moments.unbind(0)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(2, 3)).mean(dim=1).mean())


_LPIPS_MODELS: Dict[str, object] = {}


def _backbone_weights_present(net: str) -> bool:
    """True when torchvision's ImageNet weights for the LPIPS backbone are in the torch hub cache."""
    try:
        import torchvision
    except ImportError:
        return False
    weights = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}.get(net)
    if weights is None:
        return False
    url = getattr(torchvision.models, weights).IMAGENET1K_V1.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def _lpips_model(net: str):
    """The LPIPS model, or None when it cannot be built from files already on disk."""
    if net in _LPIPS_MODELS:
        return _LPIPS_MODELS[net]
    model = None
    try:
        import lpips
    except ImportError:
        lpips = None
    # Both the backbone and the package's linear heads must be local: building
    # the model would otherwise try to download the backbone.
    if lpips is not None and _backbone_weights_present(net):
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        if heads.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's deprecation notes about `pretrained`
                model = lpips.LPIPS(net=net, verbose=False).eval()
    _LPIPS_MODELS[net] = model
    return model


def lpips_available(net: str = "vgg") -> bool:
    return _lpips_model(net) is not None


def lpips_score(pred, gt, net: str = "vgg", batch: int = 8) -> Optional[float]:
    """Mean LPIPS over images (VGG backbone by default, as SyncDreamer's evaluation), or None.

    None means the ``lpips`` package or its weights are not available locally;
    nothing is downloaded.
    """
    model = _lpips_model(net)
    if model is None:
        return None
    pred, gt = _pair(pred, gt)
    # LPIPS expects [N, 3, H, W] in [-1, 1].
    to_input = lambda images: (images.permute(0, 3, 1, 2).float() * 2.0 - 1.0)  # noqa: E731
    scores = []
    with torch.no_grad():
        for start in range(0, len(pred), batch):  # batches of images bound the backbone's memory
            scores.append(model(to_input(pred[start : start + batch]), to_input(gt[start : start + batch])).reshape(-1))
    return float(torch.cat(scores).mean())


def image_metrics(pred, gt) -> Dict[str, Optional[float]]:
    """PSNR, SSIM and LPIPS (None when unavailable) of renders against ground-truth views."""
    return {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt), "lpips": lpips_score(pred, gt)}
