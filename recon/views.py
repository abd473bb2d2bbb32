"""Novel views: what Zero123 itself predicts the object looks like from another camera.

This is Zero123's own job (its demo's), and a fast check of the prior before a
long fit: if the sampled views are wrong, SDS will fit a wrong object. The
sampler is conditioned *through the SDS prior*: it builds a
:class:`~recon.prior.zero123.Zero123Prior` and calls its ``predict_noise``, so
the pose vector (``recon.prior.zero123.pose_vector``), the CLIP image embedding,
the input latent and the classifier-free guidance are the very ones the fit
uses, not copies.

The pose is given as Zero123's demo gives it, relative to the input view:

* ``polar``: change of the polar angle, degrees in [-90, 90]; positive moves the
  camera down (target elevation = input elevation - polar);
* ``azimuth``: degrees in [-180, 180]; positive turns towards the object's right;
* ``zoom``: change of the camera distance in [-0.5, 0.5]; positive moves away.

Sampling is deterministic DDIM (eta = 0) over the prior's own noise schedule,
with the "uniform" timestep spacing of the original Zero123 sampler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from recon.camera import Cameras
from recon.config import Config
from recon.errors import BadInput
from recon.prepare import ReferenceView

# Ranges of the slider values (Zero123's demo's ranges); checked before any model loads.
POLAR_RANGE = (-90.0, 90.0)
AZIMUTH_RANGE = (-180.0, 180.0)
ZOOM_RANGE = (-0.5, 0.5)
SAMPLES_RANGE = (1, 8)
GUIDANCE_RANGE = (0.0, 100.0)
DDIM_STEPS_RANGE = (1, 1000)


@dataclass
class ViewRequest:
    """What to sample: one target pose relative to the input view, ``samples`` times."""

    polar: float = 0.0
    azimuth: float = 90.0
    zoom: float = 0.0
    samples: int = 4
    guidance: float = 3.0
    ddim_steps: int = 50
    seed: int = 0

    def check(self) -> "ViewRequest":
        """Raise :class:`BadInput` (one line, the flag's name) for a value out of range."""
        for name, low, high in (
            ("polar", *POLAR_RANGE),
            ("azimuth", *AZIMUTH_RANGE),
            ("zoom", *ZOOM_RANGE),
            ("samples", *SAMPLES_RANGE),
            ("guidance", *GUIDANCE_RANGE),
            ("ddim-steps", *DDIM_STEPS_RANGE),
        ):
            value = getattr(self, name.replace("-", "_"))
            if not (low <= value <= high):  # also refuses nan
                raise BadInput(f"--{name} must be in {low:g}..{high:g}, got {value:g}")
        return self

    def cameras(self, reference_camera: Cameras) -> Cameras:
        """The ``samples`` target cameras [N] in recon's frame, from the input view's camera [1]."""
        e, a, d = (float(v) for v in (reference_camera.elevation[0], reference_camera.azimuth[0], reference_camera.distance[0]))
        n = self.samples
        return Cameras.make([e - self.polar] * n, [a + self.azimuth] * n, [d + self.zoom] * n, reference_camera.fovy[0].item())


class NovelViewSampler:
    """Zero123 conditioned on one prepared view; :meth:`sample` gives images of other views.

    ``components`` are already loaded weights (``load_zero123``); they are
    consumed, as the prior consumes them.
    """

    def __init__(self, cfg: Config, reference: ReferenceView, device, components=None):
        from recon.fit import reference_camera
        from recon.prior.zero123 import Zero123Prior, load_zero123

        device = torch.device(device)
        dtype = torch.float16 if (cfg.prior.half_precision and device.type == "cuda") else torch.float32
        if components is None:
            components = load_zero123(cfg.prior.model, device, dtype)
        # The prior frees the VAE decoder once it has conditioned; sampling needs it
        # to turn latents into pixels, so keep it aside and give it back.
        decoder, post_quant_conv = components.vae.decoder, components.vae.post_quant_conv
        self.reference_camera = reference_camera(cfg)
        self.prior = Zero123Prior(cfg.prior, reference, self.reference_camera, device, components=components, seed=cfg.seed)
        self.prior.vae.decoder = decoder
        self.prior.vae.post_quant_conv = post_quant_conv
        self.device = device
        self.image_size = cfg.prior.image_size

    @torch.no_grad()
    def sample(self, request: ViewRequest) -> List[Image.Image]:
        """``request.samples`` RGB images [image_size x image_size], deterministic for ``request.seed``."""
        prior = self.prior
        cameras = request.cameras(self.reference_camera).to(self.device)
        # the prior's guidance is its config's; a request may ask for another scale
        saved_cfg = prior.cfg
        prior.cfg = dataclasses.replace(saved_cfg, guidance_scale=float(request.guidance))
        try:
            latents = self._ddim(cameras, request.ddim_steps, request.seed)
        finally:
            prior.cfg = saved_cfg
        pixels = prior.vae.decode((latents / prior.scaling_factor).to(prior.dtype)).sample.float()
        pixels = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((p * 255).round().astype(np.uint8), "RGB") for p in pixels]

    def _ddim(self, cameras: Cameras, steps: int, seed: int) -> torch.Tensor:
        """Deterministic DDIM (eta = 0): latents [N, C, h, w] with the VAE scaling factor applied."""
        prior = self.prior
        alphas = prior.alphas_cumprod
        total = prior.num_train_timesteps
        latent_side = self.image_size // self._vae_downsampling()
        shape = (len(cameras), prior.cond_latent.shape[1], latent_side, latent_side)
        # noise drawn on the CPU so that a seed gives the same views on every device
        x = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        # the original sampler's "uniform" spacing: 1, 1 + c, 1 + 2c, ... with c = T // steps
        stride = max(total // steps, 1)
        timesteps = (torch.arange(0, total, stride) + 1).clamp(max=total - 1)[:steps].flip(0)
        for i, t in enumerate(timesteps):
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
            eps = prior.predict_noise(x, t.expand(len(cameras)).to(self.device), cameras)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def _vae_downsampling(self) -> int:
        return 2 ** (len(self.prior.vae.config.block_out_channels) - 1)


def novel_view_record(request: ViewRequest, reference_camera: Cameras) -> dict:
    """The request as run.json keeps it, with the absolute target camera it means."""
    target = request.cameras(reference_camera)[0]
    return {
        **dataclasses.asdict(request),
        "target_camera": {
            "elevation": float(target.elevation.item()),
            "azimuth": float(target.azimuth.item()),
            "distance": float(target.distance.item()),
        },
        "sampler": "ddim eta=0, uniform timesteps, prior.predict_noise conditioning",
    }


def check_prior_kind(cfg: Config) -> None:
    if cfg.prior.kind != "zero123":
        raise BadInput("novel views need Zero123 weights (--prior ID_OR_PATH); the reference prior draws no views")


def _optional(value, default):
    return default if value is None else value


def request_from(polar: Optional[float] = None, azimuth: Optional[float] = None, zoom: Optional[float] = None, samples: Optional[int] = None,
                 guidance: Optional[float] = None, ddim_steps: Optional[int] = None, seed: Optional[int] = None) -> ViewRequest:
    """A checked :class:`ViewRequest`, the defaults standing in for ``None``."""
    d = ViewRequest()
    return ViewRequest(
        polar=float(_optional(polar, d.polar)),
        azimuth=float(_optional(azimuth, d.azimuth)),
        zoom=float(_optional(zoom, d.zoom)),
        samples=int(_optional(samples, d.samples)),
        guidance=float(_optional(guidance, d.guidance)),
        ddim_steps=int(_optional(ddim_steps, d.ddim_steps)),
        seed=int(_optional(seed, d.seed)),
    ).check()


# ----------------------------------------------------------------------------- a --views run


VIEW_NAME = "view_{:02d}.png"


@dataclass
class ViewsResult:
    paths: List  # the written views (flagged ones are withheld and not written)
    withheld: List[int]  # indices of samples the safety checker flagged
    input_path: object  # the prepared view, input.png


def run_novel_views(photo_path, cfg: Config, run_dir, record, request: ViewRequest, *, mask_path=None, log=None, gate=None) -> ViewsResult:
    """gate -> prepare -> sample -> gate each view -> write: a ``--views`` run in a claimed ``run_dir``.

    The raw photo is judged before anything else; every sampled view is judged
    before it is written, and a flagged view is withheld (recorded, not written).
    ``gate`` is an already loaded :class:`~recon.gate.SafetyGate` (the app keeps
    one); by default the checker ``cfg.gate`` names is loaded.
    """
    from pathlib import Path

    from recon.device import choose_device
    from recon.gate import load_safety_gate
    from recon.run_record import INPUT_IMAGE
    from recon.prepare import foreground_mask, load_image, prepare_reference, save_reference

    log = log or (lambda message: None)
    run_dir = Path(run_dir)
    device = choose_device(cfg.device)
    image = load_image(photo_path)
    if cfg.gate.enabled:
        log("[gate]")
        if gate is None:
            gate = load_safety_gate(cfg.gate.model, device, threshold_scale=cfg.gate.threshold_scale, max_side=cfg.gate.max_side)
        verdict = gate.check(image)
        record.update(safety={"checked": True, **verdict.to_dict()})
        verdict.raise_if_flagged()
    else:
        record.update(safety={"checked": False, "note": "disabled with --no-safety-check"})
    log("[prepare]")
    mask, source = foreground_mask(image, mask_path)
    reference = prepare_reference(image, mask, cfg.prepare.border_ratio, cfg.prepare.size)
    save_reference(reference, run_dir / INPUT_IMAGE)
    record.update(foreground=source)

    log("[load prior]")
    sampler = NovelViewSampler(cfg, reference, device)
    log("[sample]")
    images = sampler.sample(request)
    del sampler
    log("[check views]")
    paths, withheld, entries = [], [], []
    for index, view in enumerate(images):
        entry = {"index": index}
        if cfg.gate.enabled:
            verdict = gate.check(view)
            entry["safety"] = verdict.to_dict()
            if verdict.flagged:
                withheld.append(index)
                entry["withheld"] = True
                entries.append(entry)
                continue
        path = run_dir / VIEW_NAME.format(index)
        _save_png(view, path)
        entry["file"] = path.name
        paths.append(path)
        entries.append(entry)
    record.finish(
        "ok",
        views={**novel_view_record(request, sampler_camera(cfg)), "outputs_checked": bool(cfg.gate.enabled), "results": entries},
        outputs={VIEW_NAME.format(e["index"]): str(run_dir / e["file"]) for e in entries if "file" in e},
        withheld=withheld,
    )
    return ViewsResult(paths, withheld, run_dir / INPUT_IMAGE)


def sampler_camera(cfg: Config) -> Cameras:
    from recon.fit import reference_camera

    return reference_camera(cfg)


def _save_png(image: Image.Image, path) -> None:
    from recon.io_utils import atomic_path

    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


__all__ = ["ViewRequest", "NovelViewSampler", "ViewsResult", "novel_view_record", "check_prior_kind", "request_from", "run_novel_views"]
