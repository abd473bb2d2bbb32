"""Score distillation maths shared by every prior.

SDS (Poole et al. 2022) pushes rendered images x towards what a denoiser
believes: noise x to x_t = sqrt(a_t) x + sqrt(1 - a_t) eps at a random t, ask the
denoiser for eps_hat, and use w(t) (eps_hat - eps) as the gradient of x (the
denoiser's Jacobian is skipped). Here w(t) = 1 - a_t, with a_t = alpha_bar(t).
The gradient is applied through a surrogate loss 0.5 ||x - sg(x - g)||^2,
whose gradient with respect to x is exactly g.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from recon.config import PriorConfig

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """alpha_bar(t) of the Stable Diffusion / Zero123 noise schedule ("scaled_linear" betas)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def timestep_range(cfg: PriorConfig, step: int) -> Tuple[float, float]:
    """The annealed [t_min, t_max] (fractions of the schedule) at ``step``."""
    progress = min(max(step / max(cfg.t_anneal_steps, 1), 0.0), 1.0)
    t_min = cfg.t_range_start[0] + progress * (cfg.t_range_end[0] - cfg.t_range_start[0])
    t_max = cfg.t_range_start[1] + progress * (cfg.t_range_end[1] - cfg.t_range_start[1])
    return t_min, max(t_max, t_min)


def sample_timesteps(
    batch: int,
    t_range: Tuple[float, float],
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """Integer timesteps [batch], uniform in the fractional range ``t_range``."""
    low = int(t_range[0] * num_train_timesteps)
    high = max(int(t_range[1] * num_train_timesteps), low + 1)
    high = min(high, num_train_timesteps)
    low = min(low, high - 1)
    return torch.randint(low, high, (batch,), generator=generator).to(device)


def add_noise(x: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x + sqrt(1 - a) eps, with ``alpha_bar`` [B] broadcast over x [B, ...]."""
    a = alpha_bar.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return a.sqrt() * x + (1.0 - a).sqrt() * noise


def sds_gradient(eps_pred: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, grad_clip: Optional[float] = None) -> torch.Tensor:
    """w(t) (eps_hat - eps) with w(t) = 1 - alpha_bar(t); non-finite entries zeroed, optional clip."""
    w = (1.0 - alpha_bar).reshape(-1, *([1] * (eps_pred.dim() - 1))).to(eps_pred.dtype)
    grad = torch.nan_to_num(w * (eps_pred - noise), nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad


def sds_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to ``x`` is ``grad / batch``: 0.5 ||x - sg(x - g)||^2 / B."""
    target = (x - grad).detach()
    return 0.5 * ((x.float() - target.float()) ** 2).sum() / x.shape[0]
