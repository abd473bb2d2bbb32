import torch

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
