"""Benchmark metrics against closed-form answers and an independent SSIM implementation."""


import numpy as np
import pytest
import torch
import trimesh

from recon.eval import metrics
from recon.eval.score import geometry_scores
from recon.mesh.data import normalize_to_unit_cube
from recon.config import EvalConfig
from recon.mesh.data import MeshData


def _mesh(tm: trimesh.Trimesh) -> MeshData:
    return MeshData.from_trimesh(tm)


def _sphere(radius=0.4, subdivisions=4, centre=(0.0, 0.0, 0.0)) -> MeshData:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    sphere.apply_translation(centre)
    return _mesh(sphere)


def _box(low, high) -> MeshData:
    low, high = np.asarray(low, float), np.asarray(high, float)
    box = trimesh.creation.box(extents=high - low)
    box.apply_translation((low + high) / 2)
    return _mesh(box)


# ----------------------------------------------------------------------------- surface samples


def test_sample_surface_is_area_weighted_and_on_the_surface():
    # Two unit squares side by side in z=0, one of them split into 8 small triangles:
    # area weighting must still give each square half of the points.
    big = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    grid = np.stack(np.meshgrid(np.linspace(1, 2, 3), np.linspace(0, 1, 3), indexing="ij"), -1).reshape(-1, 2)
    small_vertices = np.concatenate([grid, np.zeros((9, 1))], axis=1)
    idx = np.arange(9).reshape(3, 3)
    quads = np.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
    small_faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]]) + 4
    vertices = torch.tensor(np.concatenate([big, small_vertices]), dtype=torch.float32)
    faces = torch.tensor(np.concatenate([[[0, 1, 2], [0, 2, 3]], small_faces]), dtype=torch.int64)
    points = metrics.sample_surface(MeshData(vertices, faces), 20000, seed=3)
    assert points.shape == (20000, 3)
    assert np.all(points[:, 2] == 0) and points[:, 0].min() >= 0 and points[:, 0].max() <= 2
    share_left = np.mean(points[:, 0] < 1)
    assert abs(share_left - 0.5) < 0.02
    # Within a square the density is uniform: a quarter of the points in each quadrant.
    left = points[points[:, 0] < 1]
    assert abs(np.mean((left[:, 0] < 0.5) & (left[:, 1] < 0.5)) - 0.25) < 0.02
    # Same seed, same points; different seed, different points.
    assert np.array_equal(points, metrics.sample_surface(MeshData(vertices, faces), 20000, seed=3))
    assert not np.array_equal(points, metrics.sample_surface(MeshData(vertices, faces), 20000, seed=4))


def test_sample_surface_points_lie_on_a_sphere():
    points = metrics.sample_surface(_sphere(radius=0.4, subdivisions=5), 5000, seed=0)
    radius = np.linalg.norm(points, axis=1)
    assert radius.max() <= 0.4 + 1e-6 and radius.min() > 0.395  # chords of a fine icosphere


# ----------------------------------------------------------------------------- chamfer and F-score


def test_chamfer_of_identical_samples_is_zero():
    points = metrics.sample_surface(_sphere(), 3000, seed=0)
    assert metrics.chamfer_distance(points, points) == 0.0
    assert metrics.fscore(points, points, 0.01) == 1.0


def test_chamfer_of_shifted_sphere_is_the_shift():
    shift = 0.05
    a = metrics.sample_surface(_sphere(subdivisions=5), 20000, seed=0)
    b = metrics.sample_surface(_sphere(subdivisions=5, centre=(shift, 0, 0)), 20000, seed=1)
    # A sphere shifted by s has mean point-to-surface distance s/2 (radius >> s): the
    # distance from a point of the shifted sphere is |s cos(theta)|, averaged over the sphere.
    # Chamfer is the mean of both directions, so also ~ s/2; sample spacing adds a little.
    value = metrics.chamfer_distance(a, b)
    assert value == pytest.approx(shift / 2, rel=0.1)
    # Non-squared: doubling the shift doubles the distance.
    c = metrics.sample_surface(_sphere(subdivisions=5, centre=(2 * shift, 0, 0)), 20000, seed=2)
    assert metrics.chamfer_distance(a, c) == pytest.approx(2 * value, rel=0.1)


def test_chamfer_is_mean_of_both_directions():
    a = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    b = np.array([[0.0, 0, 0]])
    # a -> b: distances 0 and 1, mean 0.5; b -> a: 0. Chamfer = (0.5 + 0) / 2.
    assert metrics.chamfer_distance(a, b) == pytest.approx(0.25)
    assert metrics.chamfer_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(0.25)


def test_fscore_precision_recall():
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]])
    pred = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0]])
    # precision 2/3 (one stray point), recall 2/4 (two true points missed)
    p, r = 2 / 3, 2 / 4
    assert metrics.fscore(pred, gt, 0.1) == pytest.approx(2 * p * r / (p + r))
    assert metrics.fscore(pred + 5.0, gt, 0.1) == 0.0


# ----------------------------------------------------------------------------- volume IoU


def test_volume_iou_of_a_mesh_with_itself_is_one():
    mesh = _sphere(radius=0.45)
    assert metrics.volume_iou(mesh, mesh) == 1.0


def test_volume_iou_of_offset_cubes_matches_the_overlap():
    # Cubes of side 0.5 offset by 0.1 along x: overlap 0.4 of 0.6 along x, identical in y and z.
    a = _box([-0.25, -0.25, -0.25], [0.25, 0.25, 0.25])
    b = _box([-0.15, -0.25, -0.25], [0.35, 0.25, 0.25])
    iou = metrics.volume_iou(a, b, resolution=64)
    h = 2 * metrics.IOU_BOUND / 64
    # Each box face snaps to a voxel boundary, so the overlap and the union are each off by at most a voxel.
    assert (0.4 - h) / (0.6 + h) <= iou <= (0.4 + h) / (0.6 - h)
    assert iou == pytest.approx(0.4 / 0.6, abs=0.05)
    # A finer grid gets closer.
    assert abs(metrics.volume_iou(a, b, resolution=160) - 0.4 / 0.6) < abs(iou - 0.4 / 0.6) + 1e-9


def test_occupancy_of_a_box_on_voxel_boundaries_is_exact():
    # Faces midway between voxel centres: exactly 30 x 20 x 10 voxels inside.
    r = 64
    edges = -metrics.IOU_BOUND + np.arange(r + 1) * (2 * metrics.IOU_BOUND / r)
    box = _box([edges[10], edges[20], edges[30]], [edges[40], edges[40], edges[40]])
    grid = metrics.occupancy_grid(box, resolution=r)
    expected = np.zeros((r, r, r), bool)
    expected[10:40, 20:40, 30:40] = True
    assert np.array_equal(grid, expected)


def test_occupancy_of_a_sphere_is_its_voxelisation():
    radius = 0.42
    mesh = _sphere(radius=radius, subdivisions=6)  # chord error ~1e-4, far below a voxel
    grid = metrics.occupancy_grid(mesh, resolution=64)
    c = metrics.voxel_centres(64)
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    distance = np.sqrt(x**2 + y**2 + z**2)
    # Only voxel centres within the icosphere's chord error of the sphere may disagree.
    certain = np.abs(distance - radius) > 1e-3
    assert np.array_equal(grid[certain], (distance < radius)[certain])


def test_volume_iou_of_nested_spheres():
    inner, outer = _sphere(radius=0.25, subdivisions=5), _sphere(radius=0.45, subdivisions=5)
    assert metrics.volume_iou(inner, outer) == pytest.approx((0.25 / 0.45) ** 3, abs=0.02)


def test_occupancy_survives_a_small_hole():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    full = _mesh(sphere)
    # Remove the faces around one vertex: rays along one axis through the hole
    # see a single crossing, but the other two axes outvote them.
    holed = MeshData(full.vertices, full.faces[~(full.faces == 0).any(dim=1)])
    assert len(holed.faces) < len(full.faces)
    assert metrics.volume_iou(holed, full) > 0.999


def test_volume_iou_of_nested_large_spheres_is_their_volume_ratio():
    outer = _sphere(radius=0.4, subdivisions=6)  # 81920 faces: the vectorised inside test at scale
    inner = _sphere(radius=0.3, subdivisions=6)
    assert metrics.volume_iou(inner, outer, resolution=64) == pytest.approx((0.3 / 0.4) ** 3, abs=0.03)


def test_normalize_to_unit_cube():
    box = _box([1.0, 2.0, -3.0], [3.0, 3.0, -2.5])
    normalised, scale, offset = normalize_to_unit_cube(box)
    v = normalised.vertices.numpy()
    assert scale == pytest.approx(0.5)
    np.testing.assert_allclose(v.min(0) + v.max(0), 0.0, atol=1e-6)
    assert (v.max(0) - v.min(0)).max() == pytest.approx(1.0)
    np.testing.assert_allclose(box.vertices.numpy() * scale + offset, v, atol=1e-6)
    assert torch.equal(normalised.faces, box.faces)


def test_geometry_scores_under_our_protocol():
    cfg = EvalConfig(n_surface_points=5000)
    a = _sphere(radius=0.4)
    same = geometry_scores(a, a, cfg, "recon")
    assert set(same) == {"chamfer", "volume_iou", "fscore"}
    assert same["volume_iou"] == 1.0 and same["fscore"] == 1.0 and same["chamfer"] < 0.015  # two independent samplings, ~0.02 apart
    moved = geometry_scores(_sphere(radius=0.4, centre=(0.2, 0, 0)), a, cfg, "recon")
    assert moved["chamfer"] > 0.08 and moved["volume_iou"] < 0.6 and moved["fscore"] < 0.6


# ----------------------------------------------------------------------------- images


def test_psnr_of_known_noise():
    rng = np.random.default_rng(0)
    gt = np.full((4, 32, 32, 3), 0.5)
    # +-0.1 everywhere: MSE exactly 0.01, PSNR 20 dB in every image.
    noise = np.where(rng.random(gt.shape) < 0.5, -0.1, 0.1)
    assert metrics.psnr(gt + noise, gt) == pytest.approx(20.0)
    # Per-image PSNR, then the mean: images with MSE 0.01 and 0.0001 give (20 + 40) / 2.
    pred = gt.copy()
    pred[:2] += 0.1
    pred[2:] += 0.01
    assert metrics.psnr(pred, gt) == pytest.approx(30.0)
    assert metrics.psnr(torch.tensor(gt), torch.tensor(gt)) == pytest.approx(100.0)


def test_ssim_of_identical_images_is_one():
    images = np.random.default_rng(1).random((2, 40, 40, 3))
    assert metrics.ssim(images, images) == pytest.approx(1.0, abs=1e-12)


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    # Smooth images with structure (blurred noise) plus distortions of several kinds.
    base = np.cumsum(np.cumsum(rng.random((3, 64, 48, 3)), axis=1), axis=2)
    base = (base - base.min()) / (base.max() - base.min())
    pred = np.clip(base * 0.8 + 0.05 * rng.standard_normal(base.shape) + 0.1, 0, 1)
    reference = np.mean(
        [
            skimage_metrics.structural_similarity(
                pred[i], base[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
            )
            for i in range(len(base))
        ]
    )
    value = metrics.ssim(pred, base)
    assert value == pytest.approx(reference, abs=1e-3)
    assert value < 0.95  # the distortion is visible: the comparison is not trivially 1 = 1
    assert metrics.ssim(torch.tensor(pred[0]), torch.tensor(base[0])) == pytest.approx(metrics.ssim(pred[:1], base[:1]))


def test_ssim_is_symmetric_and_decreases_with_noise():
    rng = np.random.default_rng(3)
    gt = rng.random((1, 32, 32, 3)) * 0.5 + 0.25
    mild = gt + 0.02 * rng.standard_normal(gt.shape)
    strong = gt + 0.2 * rng.standard_normal(gt.shape)
    assert metrics.ssim(mild, gt) == pytest.approx(metrics.ssim(gt, mild))
    assert metrics.ssim(strong, gt) < metrics.ssim(mild, gt) < 1.0


def test_image_shape_errors():
    with pytest.raises(ValueError):
        metrics.psnr(np.zeros((2, 16, 16, 3)), np.zeros((2, 16, 17, 3)))
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((16, 16, 4)), np.zeros((16, 16, 4)))


def test_lpips_is_none_without_the_lpips_package(monkeypatch):
    # Whatever this machine has cached: without the package the score is
    # reported missing, never invented, and the other metrics are unaffected.
    import sys

    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` raises ImportError
    monkeypatch.setattr(metrics, "_LPIPS_MODELS", {})
    images = np.random.default_rng(4).random((2, 64, 64, 3))
    assert not metrics.lpips_available()
    assert metrics.lpips_score(images, images) is None
    result = metrics.image_metrics(images, images)
    assert result["lpips"] is None
    assert result["ssim"] == pytest.approx(1.0) and result["psnr"] == pytest.approx(100.0)


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def _stand_in_lpips(tmp_path, monkeypatch, built):
    """An importable ``lpips`` module whose model returns the mean absolute difference, its heads on disk."""
    import sys
    import types

    package = tmp_path / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "weights" / "v0.1" / "vgg.pth").write_bytes(b"heads")
    module = types.ModuleType("lpips")
    module.__file__ = str(package / "__init__.py")

    module.LPIPS = lambda **kwargs: built.append(kwargs) or _MeanAbsDifference()
    monkeypatch.setitem(sys.modules, "lpips", module)
    monkeypatch.setattr(metrics, "_LPIPS_MODELS", {})
    # torchvision only names the backbone's weight file; a stand-in keeps the tests the same on every machine.
    weights = types.SimpleNamespace(IMAGENET1K_V1=types.SimpleNamespace(url=VGG16_URL))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=types.SimpleNamespace(VGG16_Weights=weights)))


class _MeanAbsDifference(torch.nn.Module):
    def forward(self, a, b):  # [N, 3, H, W] in [-1, 1] -> [N, 1, 1, 1]
        assert a.min() >= -1 and a.max() <= 1
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_uses_the_model_when_backbone_and_heads_are_local(tmp_path, monkeypatch):
    built = []
    _stand_in_lpips(tmp_path, monkeypatch, built)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"backbone")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    a = np.zeros((3, 16, 16, 3))
    b = np.full((3, 16, 16, 3), 0.25)
    # Inputs are mapped to [-1, 1] first, so a 0.25 difference becomes 0.5; 9 images in batches of 2.
    assert metrics.lpips_score(np.concatenate([a] * 3), np.concatenate([b] * 3), batch=2) == pytest.approx(0.5)
    assert built == [{"net": "vgg", "verbose": False}]


def test_lpips_never_builds_a_model_without_local_backbone_weights(tmp_path, monkeypatch):
    # Even with the lpips package importable and its linear heads on disk, no
    # model may be built, and so nothing downloaded, while the backbone's
    # ImageNet weights are not in the torch hub cache.
    built = []
    _stand_in_lpips(tmp_path, monkeypatch, built)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    images = np.zeros((1, 32, 32, 3))
    assert metrics.lpips_score(images, images) is None
    assert built == []
