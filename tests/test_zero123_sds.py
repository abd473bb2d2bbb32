"""The Zero123 prior: conditioning as trained, and the SDS gradient checked against a hand computation.

A stub UNet (a fixed, simple function of its inputs that records what it was
given) stands in for the denoiser, so the guided noise, the SDS gradient and
the classifier-free guidance wiring can be computed independently here.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon.camera import Cameras
from recon.config import PriorConfig
from recon.prepare import ReferenceView
from recon.prior.zero123 import Zero123Prior
from recon.prior.zero123_loading import load_zero123
from tiny_zero123 import CLIP_IMAGE, build_tiny_zero123

IMAGE_SIZE = 64  # the prior's working resolution in these tests (256 for the real model)
REFERENCE_CAMERA = (10.0, 20.0, 2.0)  # elevation, azimuth, distance of the input view


class RecordingUNet(nn.Module):
    """eps = tanh(0.3 x - 0.2 c + mean(tokens) + t / 1000), per sample; remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a dtype and device
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        self.calls.append({"sample": sample.clone(), "timestep": timestep.clone(), "tokens": encoder_hidden_states.clone()})
        return (stub_eps(sample, timestep, encoder_hidden_states),)


def stub_eps(sample, timestep, tokens):
    channels = sample.shape[1] // 2
    shift = tokens.mean(dim=(1, 2))[:, None, None, None] + timestep.float()[:, None, None, None] / 1000.0
    return torch.tanh(0.3 * sample[:, :channels] - 0.2 * sample[:, channels:] + shift)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_zero123(tmp_path_factory.mktemp("zero123") / "model", layout="cc_projection")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """Loaded once; each prior gets its own copy (a prior frees parts of what it is given)."""
    return load_zero123(str(tiny_model))


def _reference():
    generator = torch.Generator().manual_seed(3)
    rgba = torch.rand(IMAGE_SIZE, IMAGE_SIZE, 4, generator=generator)
    rgba[..., 3] = (rgba[..., 3] > 0.3).float()  # an object on a transparent background
    return ReferenceView(rgba)


def _prior(model_path, components=None, **overrides):
    values = dict(model=str(model_path), image_size=IMAGE_SIZE, guidance_scale=3.0, half_precision=True)
    values.update(overrides)
    cfg = PriorConfig(**values)
    camera = Cameras.make(*REFERENCE_CAMERA, 40.0)
    components = copy.deepcopy(components) if components is not None else None
    return Zero123Prior(cfg, _reference(), camera, torch.device("cpu"), components=components)


def _hand_pose(elevation, azimuth, distance, stable=False):
    e_c, a_c, d_c = REFERENCE_CAMERA
    last = math.radians(90.0 - e_c) if stable else distance - d_c
    turn = math.radians(azimuth - a_c)
    return [math.radians(e_c - elevation), math.sin(turn), math.cos(turn), last]


def test_conditioning_is_computed_as_trained_and_encoders_are_freed(tiny_model, loaded):
    prior = _prior(tiny_model)  # loads cfg.model itself
    assert prior.dtype == torch.float32  # half precision is for CUDA only

    fresh = loaded
    rgba = _reference().rgba
    over_white = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    image = over_white.permute(2, 0, 1)[None]
    with torch.no_grad():
        # CLIP: bicubic (align_corners) to the encoder's size, the processor config's mean / std
        pixels = F.interpolate(image, size=(CLIP_IMAGE, CLIP_IMAGE), mode="bicubic", align_corners=True)
        pixels = (pixels - torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.4, 0.8]).view(1, 3, 1, 1)
        embedding = fresh.image_encoder(pixel_values=pixels).image_embeds
        # the input latent: image in [-1, 1], the posterior's mode, NOT multiplied by the scaling factor
        latent = fresh.vae.encode(image * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(prior.clip_embedding, embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prior.cond_latent, latent, rtol=1e-5, atol=1e-6)
    assert prior.cond_latent.shape == (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)

    assert prior.vae.decoder is None  # renders are only ever encoded
    assert prior.vae.encoder is not None


@pytest.mark.parametrize("stable", [False, True])
def test_camera_embedding_projects_clip_and_pose(tiny_model, loaded, stable):
    prior = _prior(tiny_model, loaded, stable=stable)
    cameras = Cameras.make([30.0, -5.0], [110.0, -60.0], [2.0, 2.5], 40.0)
    pose = torch.tensor([_hand_pose(30.0, 110.0, 2.0, stable), _hand_pose(-5.0, -60.0, 2.5, stable)])
    expected = torch.cat([prior.clip_embedding.expand(2, -1), pose], dim=-1) @ prior.projection.weight.T + prior.projection.bias
    got = prior.camera_embedding(cameras)
    assert got.shape == (2, 1, prior.projection.out_features)
    torch.testing.assert_close(got[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_clip", [None, 0.002])
def test_sds_gradient_and_guidance_match_a_hand_computation(tiny_model, loaded, grad_clip):
    prior = _prior(tiny_model, loaded, guidance_scale=2.5, grad_clip=grad_clip)
    stub = RecordingUNet()
    prior.unet = stub

    generator = torch.Generator().manual_seed(7)
    images = torch.rand(2, 48, 48, 3, generator=generator).requires_grad_(True)  # resized to 64 inside
    cameras = Cameras.make([25.0, -5.0], [90.0, 200.0], [2.0, 2.0], 40.0)
    t = torch.tensor([120, 640])
    noise = torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator)

    out = prior.sds_loss(images, cameras, step=0, t=t, noise=noise)
    out["loss_sds"].backward()

    # --- by hand -------------------------------------------------------------------------
    x = images.detach().clone().requires_grad_(True)
    resized = F.interpolate(x.permute(0, 3, 1, 2), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    latents = prior.vae.encode(resized * 2 - 1).latent_dist.mode() * prior.vae.config.scaling_factor
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    pose = torch.tensor([_hand_pose(25.0, 90.0, 2.0), _hand_pose(-5.0, 200.0, 2.0)])
    with torch.no_grad():
        tokens = (torch.cat([prior.clip_embedding.expand(2, -1), pose], -1) @ prior.projection.weight.T + prior.projection.bias)[:, None]
    cond = prior.cond_latent.expand(2, -1, -1, -1)
    eps_uncond = stub_eps(torch.cat([noisy, torch.zeros_like(cond)], 1), t, torch.zeros_like(tokens))
    eps_cond = stub_eps(torch.cat([noisy, cond], 1), t, tokens)
    eps = eps_uncond + 2.5 * (eps_cond - eps_uncond)
    grad = (1 - a) * (eps - noise)
    if grad_clip is not None:
        assert grad.abs().max() > grad_clip  # the clip really bites in this case
        grad = grad.clamp(-grad_clip, grad_clip)
    expected_loss = 0.5 * (grad**2).sum() / 2
    (expected_image_grad,) = torch.autograd.grad((latents * grad.detach()).sum() / 2, x)

    torch.testing.assert_close(out["loss_sds"].detach(), expected_loss.detach(), rtol=1e-5, atol=1e-8)
    # equal up to float rounding (the surrogate's x - (x - g) is g only up to rounding)
    scale = expected_image_grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(images.grad, expected_image_grad, rtol=1e-5, atol=1e-5 * scale)
    assert out["t"] == pytest.approx(380.0)

    # --- what the UNet was given: one batch [unconditional; conditional] --------------------
    (call,) = stub.calls
    assert torch.equal(call["timestep"], torch.cat([t, t]))
    assert torch.count_nonzero(call["sample"][:2, 4:]) == 0  # no image latent for the unconditional half
    assert torch.count_nonzero(call["tokens"][:2]) == 0  # nor a CLIP / pose token
    assert torch.equal(call["sample"][2:, 4:], cond)
    torch.testing.assert_close(call["tokens"][2:], tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call["sample"][:2, :4], noisy, rtol=1e-5, atol=1e-6)
    assert torch.equal(call["sample"][:2, :4], call["sample"][2:, :4])


def test_timesteps_follow_the_annealed_range_and_runs_repeat(tiny_model, loaded):
    first, second = _prior(tiny_model, loaded), _prior(tiny_model, loaded)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    cameras = Cameras.make(0.0, [0.0, 180.0], 2.0, 40.0)
    early = [first.sds_loss(images, cameras, step=0) for _ in range(2)]
    again = second.sds_loss(images, cameras, step=0)
    assert again["loss_sds"].item() == early[0]["loss_sds"].item()  # same seed, same draws
    assert early[0]["loss_sds"].item() != early[1]["loss_sds"].item()  # fresh draws each call
    assert (early[0]["t_min"], early[0]["t_max"]) == pytest.approx((0.02, 0.98))
    assert 20 <= early[0]["t"] < 980
    # annealed range at the end: t in [0.02, 0.50] of 1000 steps
    late = first.sds_loss(images, cameras, step=10**6)
    assert (late["t_min"], late["t_max"]) == pytest.approx((0.02, 0.50))
    assert 20 <= late["t"] < 500


def test_real_tiny_unet_gives_finite_gradients_to_the_renders(tiny_model, loaded):
    prior = _prior(tiny_model, loaded)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    out = prior.sds_loss(images, Cameras.make([0.0, 30.0], [45.0, -120.0], 2.0, 40.0), step=100)
    assert out["loss_sds"].requires_grad and out["loss_sds"].dim() == 0
    out["loss_sds"].backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert set(out) >= {"loss_sds", "t", "grad_norm"}
    assert out["grad_norm"] > 0 and 20 <= out["t"] <= 980  # the default timestep range



def test_recomputing_the_vae_encoder_gives_the_same_latents_and_gradients(tiny_model, loaded):
    """prior.recompute_vae encodes renders one at a time and recomputes them in the backward pass:
    the same latents and the same gradients with respect to the renders."""
    images = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    results = []
    for recompute in (False, True):
        prior = _prior(tiny_model, loaded, recompute_vae=recompute)
        renders = images.clone().requires_grad_(True)
        latents = prior.encode_images(renders)
        (latents * torch.linspace(-1.0, 1.0, latents.numel()).view_as(latents)).sum().backward()
        results.append((latents.detach(), renders.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    assert results[0][1].abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_computes_the_same_sds_as_cpu(tiny_model, loaded):
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 48, 48, 3, generator=generator)
    cameras = Cameras.make([20.0, 0.0], [60.0, -150.0], 2.0, 40.0)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator)
    results = []
    for device in ("cpu", "cuda"):
        cfg = PriorConfig(model=str(tiny_model), image_size=IMAGE_SIZE, half_precision=False)
        prior = Zero123Prior(cfg, _reference(), Cameras.make(*REFERENCE_CAMERA, 40.0), torch.device(device), components=copy.deepcopy(loaded))
        x = images.to(device).requires_grad_(True)
        out = prior.sds_loss(x, cameras, step=0, t=t, noise=noise)
        out["loss_sds"].backward()
        results.append((out["loss_sds"].item(), x.grad.cpu()))
    # cuDNN convolutions use TF32 by default: agreement to a few parts in a thousand
    assert results[1][0] == pytest.approx(results[0][0], rel=5e-3)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=5e-3, atol=5e-3 * results[0][1].abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_precision_unet_matches_float32(tiny_model, loaded):
    """prior.half_precision on CUDA runs the UNet and the VAE in fp16: the same noise prediction and SDS gradient, to fp16's precision."""
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(2, 48, 48, 3, generator=generator)
    cameras = Cameras.make([20.0, 0.0], [60.0, -150.0], 2.0, 40.0)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator)
    noisy = torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator)
    results = []
    for half in (False, True):
        cfg = PriorConfig(model=str(tiny_model), image_size=IMAGE_SIZE, half_precision=half)
        prior = Zero123Prior(cfg, _reference(), Cameras.make(*REFERENCE_CAMERA, 40.0), torch.device("cuda"), components=copy.deepcopy(loaded))
        assert next(prior.unet.parameters()).dtype == next(prior.vae.parameters()).dtype == (torch.float16 if half else torch.float32)
        x = images.cuda().requires_grad_(True)
        out = prior.sds_loss(x, cameras, step=0, t=t, noise=noise)
        out["loss_sds"].backward()
        eps = prior.predict_noise(noisy.cuda(), t, cameras)
        results.append((out["loss_sds"].item(), x.grad.cpu(), eps.cpu()))
    (loss32, grad32, eps32), (loss16, grad16, eps16) = results
    assert eps16.dtype == torch.float32 and torch.isfinite(grad16).all()
    # fp16 keeps three significant digits; the tiny model loses about one more (0.7 % on a CPU emulation)
    assert (eps16 - eps32).abs().max() < 0.05 * eps32.abs().max()
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert (grad16 - grad32).norm() < 0.05 * grad32.norm()

def test_speed_benchmark_stages_and_cpu_refusal(capsys):
    from recon.bench import zero123_speed
    from recon.config import load_config

    assert zero123_speed.stage_lengths(load_config("zero123")) == [600, 600, 800]
    if not torch.cuda.is_available():
        assert zero123_speed.main([]) == 2  # the full-size model is for GPUs; --tiny is the CPU smoke test
        assert "needs a CUDA GPU" in capsys.readouterr().out
