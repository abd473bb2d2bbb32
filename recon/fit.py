"""The optimisation loop: reference-view losses plus SDS on random views.

Each step renders the input view (or a random subset of its rays) for the RGB
and mask losses, and a batch of random views whose SDS loss the prior gives.
Resolution and batch size follow the coarse-to-fine schedule in the config;
the occupancy grid is refreshed every few steps. The whole state (field,
occupancy, optimiser, random generators, step) is checkpointed so an
interrupted run resumes exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from recon.camera import Cameras, generate_rays, random_cameras, schedule_stage
from recon.config import Config, from_dict, to_dict
from recon.errors import BadInput
from recon.field.field import RadianceField
from recon.io_utils import atomic_path
from recon.prepare import ReferenceView
from recon.progress import Progress
from recon.render.occupancy import make_occupancy_grid
from recon.render.volume import render_images, render_rays, step_size


@dataclass
class FitState:
    field: RadianceField
    occupancy: object  # TorchOccupancyGrid or NerfaccOccupancyGrid
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # cameras, stratification, ray subsets (CPU generator: reproducible on any device)
    step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    prior_state: Optional[dict] = None  # a checkpoint's prior random state, handed to the prior by run_fit


def reference_camera(cfg: Config, device=None) -> Cameras:
    """The input view: azimuth 0 at the configured elevation (docs/design.md, "Cameras")."""
    return Cameras.make(cfg.camera.reference_elevation, 0.0, cfg.camera.distance, cfg.camera.fovy, device=device)


def new_fit_state(cfg: Config, device) -> FitState:
    torch.manual_seed(cfg.seed)
    field_ = RadianceField(cfg.field, device).to(device)
    occupancy = make_occupancy_grid(cfg.field.radius, cfg.render.occupancy_resolution, device)
    optimizer = torch.optim.Adam(
        [
            {"params": field_.encoding.parameters(), "lr": cfg.fit.lr},
            {"params": field_.decoder.parameters(), "lr": cfg.fit.lr_mlp},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    return FitState(field_, occupancy, optimizer, torch.Generator().manual_seed(cfg.seed))


def save_checkpoint(state: FitState, cfg: Config, path: Path, prior=None) -> None:
    """Everything an exact resume needs: field, grid, optimiser, every random generator (the prior's too), step."""
    payload = {
        "step": state.step,
        "field": state.field.state_dict(),
        "occupancy": state.occupancy.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "prior": prior.state_dict() if prior is not None else state.prior_state,
        "config": to_dict(cfg),
        "history": state.history,
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


CHECKPOINT_KEYS = ("step", "field", "occupancy", "optimizer", "generator", "torch_rng", "config")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents on the CPU; ``from_dict(payload["config"])`` is the run's config."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"no checkpoint at {path}") from None
    except Exception as error:  # truncated zips, foreign pickles, unsafe globals: all one answer
        raise BadInput(f"checkpoint {path} cannot be read ({type(error).__name__}); it is damaged or not recon's") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in payload] if isinstance(payload, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise BadInput(f"checkpoint {path} is not a recon checkpoint (missing {', '.join(missing)})")
    return payload


def restore_fit_state(payload: dict, device) -> tuple:
    """(FitState on ``device``, saved Config) from :func:`read_checkpoint`'s payload."""
    cfg = from_dict(payload["config"])
    state = new_fit_state(cfg, device)
    state.field.load_state_dict(payload["field"])
    state.occupancy.load_state_dict(payload["occupancy"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available() and len(payload["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    state.step = int(payload["step"])
    state.history = list(payload.get("history", []))
    state.prior_state = payload.get("prior")
    return state, cfg


def load_checkpoint(path: Path, device) -> tuple:
    """(FitState, Config) from a checkpoint written by :func:`save_checkpoint`."""
    return restore_fit_state(read_checkpoint(path), device)


class _ReferenceTarget:
    """The input view's rays and targets at the reference resolution, computed once."""

    def __init__(self, reference: ReferenceView, cfg: Config, device):
        resolution = cfg.camera.reference_resolution
        rgb, alpha = reference.at(resolution, background=tuple(cfg.render.background))
        origins, directions = generate_rays(reference_camera(cfg, device), resolution)
        self.origins = origins.reshape(-1, 3)
        self.directions = directions.reshape(-1, 3)
        self.rgb = rgb.to(device).reshape(-1, 3)
        self.alpha = alpha.to(device).reshape(-1, 1)
        self.n_rays = cfg.fit.reference_rays

    def pick(self, generator: torch.Generator):
        if not self.n_rays or self.n_rays >= self.origins.shape[0]:
            return self.origins, self.directions, self.rgb, self.alpha
        index = torch.randperm(self.origins.shape[0], generator=generator)[: self.n_rays].to(self.origins.device)
        return self.origins[index], self.directions[index], self.rgb[index], self.alpha[index]


def _update_occupancy(state: FitState, cfg: Config) -> None:
    step = step_size(state.field.radius, cfg.render)
    state.occupancy.update(lambda x: state.field.density(x) * step, cfg.render.occupancy_threshold, generator=state.generator)


def fit_step(state: FitState, prior, target: _ReferenceTarget, cfg: Config) -> Dict[str, float]:
    """One optimisation step; returns the loss terms as floats."""
    f = cfg.fit
    if state.step % cfg.render.occupancy_update_every == 0:
        _update_occupancy(state, cfg)
    device = target.origins.device
    background = torch.as_tensor(cfg.render.background, dtype=torch.float32, device=device)
    need_normals = f.lambda_orient > 0 or f.lambda_normal_smooth > 0
    losses: Dict[str, torch.Tensor] = {}

    origins, directions, rgb, alpha = target.pick(state.generator)
    ref = render_rays(state.field, state.occupancy, origins, directions, cfg.render, background, stratified=True, generator=state.generator)
    losses["rgb"] = torch.nn.functional.mse_loss(ref.rgb, rgb)
    losses["mask"] = torch.nn.functional.mse_loss(ref.opacity, alpha)

    stage = schedule_stage(state.step, cfg.camera.milestones)
    resolution, batch = cfg.camera.resolutions[stage], cfg.camera.batch_sizes[stage]
    if f.lambda_sds > 0 and batch > 0:
        cameras = random_cameras(batch, cfg.camera.elevation_range, cfg.camera.distance, cfg.camera.fovy, state.generator, device)
        views = render_images(state.field, state.occupancy, cameras, resolution, cfg.render, stratified=True, normals=need_normals, generator=state.generator)
        prior_out = prior.sds_loss(views.rgb, cameras, state.step)
        losses["sds"] = prior_out["loss_sds"]
        opacity = views.opacity.clamp(1e-5, 1.0 - 1e-5)
        losses["sparsity"] = opacity.mean()
        losses["opacity"] = -(opacity * opacity.log() + (1 - opacity) * (1 - opacity).log()).mean()
        if need_normals:
            losses["orient"] = views.orientation.mean()
            losses["normal_smooth"] = _normal_smoothness(state.field, views, cameras, resolution, state.generator)

    weights = {
        "rgb": f.lambda_rgb, "mask": f.lambda_mask, "sds": f.lambda_sds, "sparsity": f.lambda_sparsity,
        "opacity": f.lambda_opacity, "orient": f.lambda_orient, "normal_smooth": f.lambda_normal_smooth,
    }
    total = sum(weights[name] * value for name, value in losses.items() if weights[name] > 0)
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    state.step += 1
    stats = {name: float(value.detach()) for name, value in losses.items()}
    stats["loss"] = float(total.detach())
    # Samples kept per ray after the occupancy grid and the early stop: what the cost model's MARCH_DEPTH is measured from.
    stats["ref_samples_per_ray"] = ref.n_samples / origins.shape[0]
    if "sds" in losses:
        stats["view_samples_per_ray"] = views.n_samples / (batch * resolution * resolution)
    return stats


def _normal_smoothness(field_, views, cameras: Cameras, resolution: int, generator) -> torch.Tensor:
    """Normals at visible surface points should change little over a small offset."""
    origins, directions = generate_rays(cameras, resolution)
    visible = views.opacity[..., 0] > 0.5
    if not visible.any():
        return views.opacity.sum() * 0.0
    expected_depth = views.accumulated_depth.detach() / views.opacity.detach().clamp(min=1e-6)
    points = (origins + directions * expected_depth)[visible]
    points = points[torch.randperm(points.shape[0], generator=generator)[:4096].to(points.device)]
    jitter = torch.randn(points.shape, generator=generator).to(points.device) * 0.01
    _, _, n0 = field_.density_and_normal(points, create_graph=True)
    _, _, n1 = field_.density_and_normal(points + jitter, create_graph=True)
    return (n0 - n1).norm(dim=-1).mean()


def run_fit(
    state: FitState,
    prior,
    reference: ReferenceView,
    cfg: Config,
    checkpoint_path: Optional[Path] = None,
    quiet: bool = False,
) -> Dict[str, float]:
    """Optimise from ``state.step`` to ``cfg.fit.steps``. Ctrl-C saves a checkpoint, then re-raises.

    A state restored from a checkpoint carries the prior's random state, which
    is given to ``prior`` here: a resumed fit draws the same noise and
    timesteps as an uninterrupted one.
    """
    device = next(state.field.parameters()).device
    if state.prior_state is not None:
        prior.load_state_dict(state.prior_state)
        state.prior_state = None
    target = _ReferenceTarget(reference, cfg, device)
    progress = Progress(cfg.fit.steps, "fit", initial=state.step, quiet=quiet)
    started = time.monotonic()
    stats: Dict[str, float] = {}
    try:
        while state.step < cfg.fit.steps:
            stats = fit_step(state, prior, target, cfg)
            if state.step % 10 == 0 or state.step == cfg.fit.steps:
                state.history.append({"step": state.step, **stats})
            progress.update(1, loss=stats["loss"])
            if checkpoint_path and cfg.fit.checkpoint_every and state.step % cfg.fit.checkpoint_every == 0:
                save_checkpoint(state, cfg, checkpoint_path, prior)
    except KeyboardInterrupt:
        if checkpoint_path:
            save_checkpoint(state, cfg, checkpoint_path, prior)
        raise
    finally:
        progress.close()
    if checkpoint_path:
        save_checkpoint(state, cfg, checkpoint_path, prior)
    stats["seconds"] = time.monotonic() - started
    return stats
