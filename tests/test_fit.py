import math

import pytest
import torch

import recon.render.occupancy as occupancy
import recon.render.volume as volume
from recon import accel
from recon.bench.procedural import crate
from recon.config import load_config
from recon.eval.truth import render_photo
from recon.fit import _ReferenceTarget, fit_step, load_checkpoint, new_fit_state, run_fit, save_checkpoint
from recon.frames import PhotoCamera
from recon.mesh.data import normalize_to_unit_cube
from recon.prepare import ReferenceView
from recon.prior.reference import ReferencePrior

FAST = ["camera.resolutions=[32]", "camera.reference_resolution=64", "fit.reference_rays=512", "render.n_samples_per_ray=64"]


def _setup(steps):
    cfg = load_config("cpu", FAST + [f"fit.steps={steps}"])
    gt = normalize_to_unit_cube(crate())[0]
    prior = ReferencePrior(gt, cfg.prior, "cpu")
    # the photo taken by the fit's own reference camera: the fit frame is the truth's
    camera = PhotoCamera(cfg.camera.reference_elevation, cfg.camera.distance, cfg.camera.fovy, 128, 128)
    return cfg, prior, ReferenceView(render_photo(gt, camera))


def test_reference_prior_gradient_points_at_the_truth():
    cfg, prior, _ = _setup(1)
    from recon.camera import random_cameras

    cams = random_cameras(2, cfg.camera.elevation_range, cfg.camera.distance, cfg.camera.fovy, torch.Generator().manual_seed(0))
    truth = prior.true_views(cams, 32)
    images = torch.full_like(truth, 0.5).requires_grad_(True)
    prior.sds_loss(images, cams, step=0)["loss_sds"].backward()
    # the ideal denoiser's SDS gradient is a positive multiple of (x - x0) per image
    ratio = images.grad / (images.detach() - truth)
    valid = (images.detach() - truth).abs() > 1e-3
    for i in range(2):
        r = ratio[i][valid[i]]
        assert (r > 0).all() and torch.allclose(r, r.mean().expand_as(r), rtol=1e-3)


def test_short_fit_reduces_the_loss():
    cfg, prior, reference = _setup(40)
    state = new_fit_state(cfg, "cpu")
    target = _ReferenceTarget(reference, cfg, "cpu")
    first = [fit_step(state, prior, target, cfg)["rgb"] for _ in range(5)]
    while state.step < cfg.fit.steps:
        last = fit_step(state, prior, target, cfg)["rgb"]
    assert last < 0.8 * sum(first) / len(first)  # quality bounds live in the end-to-end self-check


def test_resume_continues_exactly(tmp_path):
    cfg, prior, reference = _setup(6)
    straight = new_fit_state(cfg, "cpu")
    run_fit(straight, prior, reference, cfg, quiet=True)

    cfg_half, prior2, _ = _setup(3)
    half = new_fit_state(cfg_half, "cpu")
    run_fit(half, prior2, reference, cfg_half, checkpoint_path=tmp_path / "checkpoint.pt", quiet=True)
    resumed, saved_cfg = load_checkpoint(tmp_path / "checkpoint.pt", "cpu")
    assert resumed.step == 3
    saved_cfg.fit.steps = 6
    # a new process builds a new prior: its random state comes from the checkpoint
    _, fresh_prior, _ = _setup(6)
    run_fit(resumed, fresh_prior, reference, saved_cfg, quiet=True)
    for a, b in zip(straight.field.parameters(), resumed.field.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_is_plain_tensors(tmp_path):
    cfg, _, _ = _setup(1)
    state = new_fit_state(cfg, "cpu")
    save_checkpoint(state, cfg, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # loads without unpickling code
    saved_field = loaded["field"]
    for name, tensor in state.field.state_dict().items():
        assert torch.equal(saved_field[name], tensor), name
    assert loaded["step"] == 0


# ----------------------------------------------------------------------------- one fit step on every implementation
#
# On a GPU a fit step runs nerfacc's grid and packed compositing where its kernels
# build, else the torch grid and dense compositing (as on the CPU). The closed form
# runs on each; the `cuda` comparisons check them against each other.

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# every loss term on, normals included (their samples come from the grid's early stop)
STEP = ["camera.resolutions=[16]", "camera.reference_resolution=32", "fit.reference_rays=0", "field.use_tcnn=never"] + [
    f"fit.lambda_{name}=1.0" for name in ("orient", "sparsity", "opacity", "normal_smooth")
]


class StandInPrior:
    """SDS that pulls every view towards grey: ((x - 0.5)^2).mean()."""

    def sds_loss(self, images, cameras, step):
        return {"loss_sds": ((images - 0.5) ** 2).mean(), "t": 500.0}


def square_photo():
    rgba = torch.zeros(64, 64, 4)
    rgba[16:48, 16:48] = torch.tensor([0.2, 0.4, 0.6, 1.0])
    return ReferenceView(rgba)


REAL_USE_NERFACC = occupancy.use_nerfacc


def use_nerfacc_kernels(monkeypatch, allowed):
    """Let recon use nerfacc's kernels (where they run) or not, as on a GPU where they failed to build."""
    choice = REAL_USE_NERFACC if allowed else (lambda device: False)
    monkeypatch.setattr(occupancy, "use_nerfacc", choice)
    monkeypatch.setattr(volume, "use_nerfacc", choice)
    if allowed and not REAL_USE_NERFACC("cuda"):
        pytest.skip(f"needs nerfacc's CUDA kernels: {accel.report().get(occupancy.NERFACC_KERNELS)}")


@pytest.mark.parametrize("kind", ["cpu", pytest.param("torch-cuda", marks=ON_CUDA), pytest.param("nerfacc-cuda", marks=ON_CUDA)])
def test_a_fit_step_through_an_empty_field_gives_the_closed_form_losses(kind, monkeypatch):
    """Nothing in the box: every render is the background, and each loss term follows from the photo alone."""
    device = "cuda" if kind.endswith("cuda") else "cpu"
    if device == "cuda":
        use_nerfacc_kernels(monkeypatch, kind == "nerfacc-cuda")
    cfg = load_config("cpu", STEP)
    state = new_fit_state(cfg, device)
    assert isinstance(state.occupancy, occupancy.NerfaccOccupancyGrid if kind == "nerfacc-cuda" else occupancy.TorchOccupancyGrid)
    with torch.no_grad():
        state.field.decoder[-1].bias[0] = -25.0  # density below exp(-25 + 10): opacity under 1e-6 on any ray
    target = _ReferenceTarget(square_photo(), cfg, device)
    stats = fit_step(state, StandInPrior(), target, cfg)

    background = torch.tensor(cfg.render.background, device=device)
    least = 1e-5  # opacities are clamped to [1e-5, 1 - 1e-5] in the sparsity and opacity terms
    expected = {
        "rgb": ((background - target.rgb) ** 2).mean().item(),
        "mask": (target.alpha**2).mean().item(),
        "sds": ((background - 0.5) ** 2).mean().item(),
        "sparsity": least,
        "opacity": -(least * math.log(least) + (1 - least) * math.log(1 - least)),
        "orient": 0.0,
        "normal_smooth": 0.0,  # no pixel is half opaque
    }
    assert expected["rgb"] > 0.05 and expected["mask"] > 0.2  # the photo is not the background
    for name, value in expected.items():
        # float32's log(1 - 1e-5) is good to 0.1 %
        assert stats[name] == pytest.approx(value, rel=1e-3 if name == "opacity" else 1e-4, abs=1e-8), name
    f = cfg.fit
    weights = {"rgb": f.lambda_rgb, "mask": f.lambda_mask, "sds": f.lambda_sds, "sparsity": 1.0, "opacity": 1.0, "orient": 1.0, "normal_smooth": 1.0}
    assert stats["loss"] == pytest.approx(sum(weights[name] * value for name, value in expected.items()), rel=1e-4)
    grads = [p.grad for p in state.field.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def step_twins(cfg, monkeypatch, devices_and_kernels):
    """One fit state per (device, nerfacc allowed), all with the first one's field."""
    states = []
    for device, allowed in devices_and_kernels:
        use_nerfacc_kernels(monkeypatch, allowed)
        states.append(new_fit_state(cfg, device))
        states[-1].field.load_state_dict(states[0].field.state_dict())
    return states


def compare_steps(cfg, monkeypatch, states, kernels, rel, grad_rel):
    """Take one fit step on each state; the loss terms and every parameter's gradient agree."""
    results = []
    for state, allowed in zip(states, kernels):
        use_nerfacc_kernels(monkeypatch, allowed)
        device = next(state.field.parameters()).device
        stats = fit_step(state, StandInPrior(), _ReferenceTarget(square_photo(), cfg, device), cfg)
        results.append((stats, [p.grad.cpu() for p in state.field.parameters()]))
    (stats_a, grads_a), (stats_b, grads_b) = results
    assert stats_a.keys() == stats_b.keys() and stats_a["loss"] > 0
    for name in stats_a:
        assert stats_b[name] == pytest.approx(stats_a[name], rel=rel, abs=1e-6), name
    for a, b in zip(grads_a, grads_b):
        assert torch.isfinite(b).all() and a.norm() > 0
        assert (a - b).norm() <= grad_rel * a.norm()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_fit_step_on_the_gpu_matches_the_cpu(monkeypatch):
    """PyTorch on both (the GPU as without nerfacc's kernels): cameras, rays and jitter come from the same CPU generator."""
    cfg = load_config("cpu", STEP)
    states = step_twins(cfg, monkeypatch, [("cpu", False), ("cuda", False)])
    compare_steps(cfg, monkeypatch, states, [False, False], rel=1e-3, grad_rel=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_fit_step_on_nerfacc_matches_the_torch_grid(monkeypatch):
    """The same grid in both (nerfacc's update draws its own probe points: tested in test_volume.py), no update in the step."""
    cfg = load_config("cpu", STEP + ["render.occupancy_update_every=1000"])
    native, reference = step_twins(cfg, monkeypatch, [("cuda", True), ("cuda", False)])
    assert isinstance(native.occupancy, occupancy.NerfaccOccupancyGrid)
    assert isinstance(reference.occupancy, occupancy.TorchOccupancyGrid)
    step = volume.step_size(cfg.field.radius, cfg.render)
    reference.occupancy.update(lambda x: reference.field.density(x) * step, cfg.render.occupancy_threshold, generator=torch.Generator().manual_seed(1))
    assert 0.0 < reference.occupancy.occupied_fraction < 1.0
    native.occupancy.load_state_dict(reference.occupancy.state_dict())
    native.step = reference.step = 1  # past step 0, where the step would refresh the grid
    # nerfacc walks cells and adds up steps in float32: a rare sample on a cell face may differ
    compare_steps(cfg, monkeypatch, [reference, native], [False, True], rel=1e-3, grad_rel=1e-2)
