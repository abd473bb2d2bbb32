"""The reference prior: SDS from an ideal denoiser that knows the true object.

For verification without diffusion weights (docs/design.md, "Score distillation"). At each sampled camera
it renders the true view x0 of a known mesh. A denoiser that knows x0 exactly
predicts, for x_t = sqrt(a) x + sqrt(1 - a) eps,

    eps_hat = (x_t - sqrt(a) x0) / sqrt(1 - a)

so the SDS gradient w(t) (eps_hat - eps) = sqrt(a (1 - a)) (x - x0): the
rendered image is pulled towards the truth with a timestep-dependent weight.
It goes through the same noise, timestep annealing and SDS surrogate as
Zero123 (recon.prior.sds), in pixel space instead of latent space, so the
fit loop, schedules and everything downstream are checked against ground truth.
"""

from __future__ import annotations

from typing import Optional

import torch

from recon.camera import Cameras
from recon.config import PriorConfig
from recon.mesh.data import MeshData
from recon.prior import sds
from recon.render.mesh_raster import render_mesh


class ReferencePrior:
    def __init__(self, mesh: MeshData, cfg: PriorConfig, device, background=(1.0, 1.0, 1.0), seed: int = 0, ssaa: int = 1):
        self.mesh = mesh.to(device)
        # Samples a side per pixel of the truth SDS pulls towards: the refinement's supersampled
        # views average each pixel's area, and need a truth averaged the same way (recon.mesh.refine.truth_sampling).
        self.ssaa = ssaa
        self.cfg = cfg
        self.device = torch.device(device)
        self.background = tuple(background)
        self.alphas_cumprod = sds.scaled_linear_alphas_cumprod().to(self.device)
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def true_views(self, cameras: Cameras, height: int, width: Optional[int] = None, ssaa: int = 1) -> torch.Tensor:
        """Ground-truth renders [N, H, W, 3] over the background (unlit albedo).

        The fit's views use one sample per pixel centre, as the field's renders
        do; evaluation and (with ``refine.antialiased_truth``) the refinement's SDS
        use ``ssaa`` > 1 for antialiased truth.
        """
        return render_mesh(self.mesh, cameras.to(self.device), height, width, background=self.background, shading="albedo", ssaa=ssaa)["rgb"]

    def sds_loss(self, images: torch.Tensor, cameras: Cameras, step: int) -> dict:
        batch = images.shape[0]
        truth = self.true_views(cameras, images.shape[1], images.shape[2], ssaa=self.ssaa)
        t = sds.sample_timesteps(batch, sds.timestep_range(self.cfg, step), generator=self.generator, device=self.device)
        alpha_bar = self.alphas_cumprod[t]
        noise = torch.randn(images.shape, generator=self.generator).to(images.device)
        with torch.no_grad():
            noisy = sds.add_noise(images.detach(), noise, alpha_bar)
            a = alpha_bar.reshape(-1, 1, 1, 1)
            eps_hat = (noisy - a.sqrt() * truth) / (1.0 - a).sqrt()
            grad = sds.sds_gradient(eps_hat, noise, alpha_bar, self.cfg.grad_clip)
        return {"loss_sds": sds.sds_surrogate_loss(images, grad), "t": t.float().mean().item()}
