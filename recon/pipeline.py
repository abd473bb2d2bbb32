"""The orchestrator: the only place that knows the order of the stages.

    gate -> prepare -> fit -> extract -> texture -> export

``reconstruct_reference`` is the self-check: the same fit, extraction and
export, driven by the reference prior of a known mesh and scored against it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from recon.bench.metrics import image_metrics, mesh_metrics, normalize_to_unit_cube
from recon.camera import Cameras, orbit_cameras
from recon.config import Config, apply_overrides, from_dict, to_dict
from recon.errors import BadInput, Refused
from recon.fit import load_checkpoint, new_fit_state, read_checkpoint, reference_camera, restore_fit_state, run_fit
from recon.io_utils import write_json_atomic
from recon.mesh.data import MeshData
from recon.mesh.export import export_asset
from recon.mesh.extract import CARVE_DEPTH_OPACITY, DepthViews, extract_mesh
from recon.mesh.preview import write_previews
from recon.mesh.texture import bake_texture, bake_vertex_colors, unwrap
from recon.prepare import ReferenceView
from recon.prior.reference import ReferencePrior
from recon.render.mesh_raster import render_mesh
from recon.render.volume import render_images
from recon.run_record import RunRecord

CHECKPOINT_NAME = "checkpoint.pt"
INPUT_IMAGE = "input.png"


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA GPU is visible to PyTorch")
    if name not in ("cpu", "cuda"):
        raise BadInput(f"unknown device '{name}' (use cpu, cuda or auto)")
    return torch.device(name)


class StageTimer:
    """Wall time per stage, for run.json and metrics.json."""

    def __init__(self, log=None):
        self.seconds: Dict[str, float] = {}
        self.log = log

    @contextmanager
    def stage(self, name: str):
        if self.log:
            self.log(f"[{name}]")
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 3)


def load_reference_mesh(path: Path) -> MeshData:
    """A mesh file, in our +z-up frame, normalised to the unit cube.

    glTF files are +y up by specification and are turned to +z up; other
    formats are taken as +z up (as Google Scanned Objects are).
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"reference mesh not found: {path}")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as error:  # trimesh raises many types for unreadable files
        raise BadInput(f"cannot read mesh {path}: {error}") from None
    mesh = MeshData.from_trimesh(loaded)
    if mesh.faces.shape[0] == 0:
        raise BadInput(f"mesh {path} has no faces")
    if path.suffix.lower() in (".glb", ".gltf"):
        x, y, z = mesh.vertices.unbind(-1)
        mesh = mesh.with_vertices(torch.stack([x, -z, y], dim=-1))  # +y up -> +z up
    return normalize_to_unit_cube(mesh)[0]


def eval_cameras(cfg: Config, device=None) -> Cameras:
    e = cfg.eval
    return orbit_cameras(e.n_views, e.elevation, e.distance, e.fovy, device=device)


def reference_view_from_prior(prior: ReferencePrior, cfg: Config) -> ReferenceView:
    """The input view of a known mesh as straight-alpha RGBA, rendered like a prepared photo."""
    camera = reference_camera(cfg, prior.device)
    out = render_mesh(prior.mesh, camera, cfg.prepare.size, background=(0.0, 0.0, 0.0), shading="albedo", ssaa=2)
    alpha = out["alpha"][0]
    colour = out["rgb"][0] / alpha.clamp(min=1e-6)  # over black, rgb is premultiplied
    return ReferenceView(torch.cat([colour.clamp(0, 1) * (alpha > 0), alpha], dim=-1).cpu())


@torch.no_grad()
def render_field_views(state, cameras: Cameras, cfg: Config) -> torch.Tensor:
    return render_images(state.field, state.occupancy, cameras, cfg.eval.resolution, cfg.render).rgb.clamp(0, 1)


def fit_or_resume(cfg: Config, device, prior, reference: ReferenceView, run_dir: Path, resume: bool, quiet: bool):
    checkpoint = run_dir / CHECKPOINT_NAME
    if resume and checkpoint.is_file():
        state, _ = load_checkpoint(checkpoint, device)  # cfg: the saved one with the resume's overrides
    else:
        state = new_fit_state(cfg, device)
    run_fit(state, prior, reference, cfg, checkpoint_path=checkpoint, quiet=quiet)
    return state


CARVING_RINGS = 4  # rings of 8 views spanning the trained elevations


@torch.no_grad()
def rendered_depth_views(state, cfg: Config) -> DepthViews:
    """Depth and opacity of the field from all around the object (for carving the mesh's solid).

    Only elevations the fit trained on (``camera.elevation_range``): outside
    them the field was never supervised, its fog would carve real surface
    away (crate: chamfer 0.020 with views from -30 to 85 degrees, 0.012 within).
    """
    device = next(state.field.parameters()).device
    low, high = cfg.camera.elevation_range
    elevations = [low + (high - low) * i / (CARVING_RINGS - 1) for i in range(CARVING_RINGS)]
    views = [orbit_cameras(8, elevation, cfg.camera.distance, cfg.camera.fovy, device=device, start_azimuth=22.5 * (i % 2)) for i, elevation in enumerate(elevations)]
    cameras = Cameras(*(torch.cat([getattr(v, name) for v in views]) for name in ("elevation", "azimuth", "distance", "fovy")))
    out = render_images(state.field, state.occupancy, cameras, cfg.extract.carve_views_resolution, cfg.render, surface_opacity=CARVE_DEPTH_OPACITY)
    return DepthViews(cameras, out.surface_distance[..., 0], out.opacity[..., 0])


def rendered_surface_points(views: DepthViews) -> torch.Tensor:
    """Where the field's rays end on opaque pixels (for a density level, when one is used)."""
    from recon.camera import generate_rays

    origins, directions = generate_rays(views.cameras, views.distance.shape[1], views.distance.shape[2])
    opaque = (views.opacity > 0.95) & torch.isfinite(views.distance)
    return (origins + directions * views.distance[..., None])[opaque]


@torch.no_grad()
def surface_colour(field, points: torch.Tensor, normals: torch.Tensor, depth: float, n_samples: int = 16) -> torch.Tensor:
    """The colour the field shows at mesh points: volume-render a short ray along -normal through each.

    The mesh's surface is a level set of a soft field, so it can sit a little
    in front of or behind where the field's renders take their colour; reading
    the albedo exactly at the mesh point picks up the unconstrained fog there.
    A ray from ``depth`` outside the surface to ``depth`` inside, composited as
    the renderer does, gives the colour a camera facing the surface would see.
    """
    device = next(field.parameters()).device
    points, normals = points.to(device), normals.to(device)
    offsets = torch.linspace(depth, -depth, n_samples, device=device)
    samples = points[:, None, :] + normals[:, None, :] * offsets[None, :, None]
    density, albedo = field(samples.reshape(-1, 3))
    density, albedo = density.reshape(-1, n_samples), albedo.reshape(-1, n_samples, 3)
    alpha = 1.0 - torch.exp(-density * (2.0 * depth / (n_samples - 1)))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    weights = alpha * transmittance
    total = weights.sum(dim=1, keepdim=True)
    composited = (weights[..., None] * albedo).sum(dim=1) / total.clamp(min=1e-6)
    # where the short ray saw nothing (the mesh strayed from the field), fall back to the point itself
    at_point = albedo[:, n_samples // 2]
    return torch.where(total > 1e-3, composited, at_point).float()


def finish_asset(state, cfg: Config, run_dir: Path, timer: StageTimer):
    """Fitted field -> mesh -> texture -> files. Returns (textured mesh, {kind: path})."""
    with timer.stage("extract"):
        views = rendered_depth_views(state, cfg)
        mesh = extract_mesh(state.field.density, state.field.radius, cfg.extract, surface_points=rendered_surface_points(views), views=views)

    def albedo(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        return surface_colour(state.field, points, normals, cfg.texture.bake_depth)

    with timer.stage("texture"):
        if cfg.texture.mode == "vertex":
            mesh = bake_vertex_colors(mesh, albedo, normals=True)
        elif cfg.texture.mode == "texture":
            mesh = bake_texture(unwrap(mesh, cfg.texture.size, cfg.texture.padding), albedo, cfg.texture.size, cfg.texture.padding, normals=True)
        else:
            raise BadInput(f"texture.mode must be 'texture' or 'vertex', got '{cfg.texture.mode}'")
    mesh = mesh.to("cpu")
    with timer.stage("export"):
        paths = export_asset(mesh, run_dir, formats=tuple(cfg.export.formats))
        if cfg.export.preview:
            paths.update(write_previews(mesh, run_dir, frames=cfg.export.preview_frames, resolution=cfg.export.preview_resolution))
    return mesh, paths


def score_against(gt_mesh: MeshData, truth_views: torch.Tensor, state, mesh: MeshData, cfg: Config) -> Dict[str, float]:
    """Geometry and image scores of the exported mesh and of the field, against the truth."""
    cameras = eval_cameras(cfg, truth_views.device)
    metrics: Dict[str, float] = dict(mesh_metrics(mesh.to("cpu"), gt_mesh.to("cpu"), cfg.eval, seed=cfg.seed))
    field_scores = image_metrics(render_field_views(state, cameras, cfg), truth_views)
    mesh_views = render_mesh(mesh.to(truth_views.device), cameras, cfg.eval.resolution, background=tuple(cfg.render.background), ssaa=2)["rgb"]
    mesh_scores = image_metrics(mesh_views, truth_views)
    metrics.update(mesh_scores)  # psnr / ssim / lpips: the exported asset, the product users get
    metrics.update({f"field_{name}": value for name, value in field_scores.items()})
    metrics["faces"] = int(mesh.faces.shape[0])
    return metrics


def reconstruct_reference(
    gt_mesh: MeshData,
    cfg: Config,
    run_dir: Path,
    device: Optional[torch.device] = None,
    quiet: bool = False,
    resume: bool = False,
    log=None,
) -> Dict[str, float]:
    """Fit a known mesh through the reference prior, export it and score the result (the self-check).

    ``gt_mesh`` must already be in the unit cube. Returns the metrics that go
    into ``metrics.json``: chamfer, volume_iou, fscore, psnr, ssim, lpips of
    the exported textured mesh, field_psnr / field_ssim of the field's own
    renders (16 views at the evaluation elevation, 256x256, over white), and
    seconds.
    """
    started = time.monotonic()
    device = device or choose_device(cfg.device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(log)
    prior = ReferencePrior(gt_mesh, cfg.prior, device, background=tuple(cfg.render.background), seed=cfg.seed)
    with timer.stage("prepare"):
        reference = reference_view_from_prior(prior, cfg)
    with timer.stage("fit"):
        state = fit_or_resume(cfg, device, prior, reference, run_dir, resume, quiet)
    mesh, _ = finish_asset(state, cfg, run_dir, timer)
    with timer.stage("evaluate"):
        truth = prior.true_views(eval_cameras(cfg, device), cfg.eval.resolution, ssaa=2)
        metrics = score_against(gt_mesh, truth, state, mesh, cfg)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    metrics["stage_seconds"] = timer.seconds
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- runs from the CLI


def create_record(run_dir: Path, cfg: Config, mode: str, **fields) -> RunRecord:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=False) if not run_dir.exists() else None
    record = RunRecord(
        run_dir,
        mode=mode,
        config=to_dict(cfg),
        seed=cfg.seed,
        device=str(choose_device(cfg.device)),
        weights={"prior": cfg.prior.model if cfg.prior.kind == "zero123" else "reference", "safety_checker": cfg.gate.model if cfg.gate.enabled else None},
        **fields,
    )
    record.save()
    return record


def open_record(run_dir: Path) -> RunRecord:
    return RunRecord.load(run_dir)


def require_run_dir(run_dir: Path) -> None:
    if not (Path(run_dir) / CHECKPOINT_NAME).is_file():
        raise BadInput(f"{run_dir} is not a recon run with a checkpoint (no {CHECKPOINT_NAME} there)")


def validate_inputs(image_path: Path, mask_path: Optional[str], cfg: Config) -> None:
    """Cheap checks of the user's files before any model is loaded."""
    from recon.prepare import validate_image

    validate_image(image_path)
    if mask_path is not None:
        validate_image(mask_path)
    if cfg.prior.kind not in ("zero123", "reference"):
        raise BadInput(f"prior.kind must be 'zero123' or 'reference', got '{cfg.prior.kind}'")


def build_prior(cfg: Config, reference: ReferenceView, device):
    if cfg.prior.kind == "reference":
        if not cfg.prior.reference_mesh:
            raise BadInput("prior.kind=reference needs prior.reference_mesh=PATH (the true mesh)")
        mesh = load_reference_mesh(Path(cfg.prior.reference_mesh))
        return ReferencePrior(mesh, cfg.prior, device, background=tuple(cfg.render.background), seed=cfg.seed)
    from recon.prior.zero123 import Zero123Prior

    return Zero123Prior(cfg.prior, reference, reference_camera(cfg), device, seed=cfg.seed)


def gate_image(image, cfg: Config, device, record: RunRecord, log) -> None:
    """The safety verdict on the raw image; a flagged image stops the run (Refused)."""
    from dataclasses import asdict

    from recon.gate import load_safety_gate

    if not cfg.gate.enabled:
        record.update(safety={"checked": False, "note": "disabled with --no-safety-check"})
        return
    gate = load_safety_gate(cfg.gate.model, device, threshold_scale=cfg.gate.threshold_scale, max_side=cfg.gate.max_side)
    verdict = gate.check(image)
    record.update(safety={"checked": True, **asdict(verdict)})
    del gate
    if verdict.flagged:
        raise Refused("the safety checker flagged this image; nothing was reconstructed (see the Zero123 model card's use restrictions)")


def reconstruct_image(
    image_path: Path,
    cfg: Config,
    run_dir: Path,
    record: RunRecord,
    mask_path: Optional[str] = None,
    log=None,
    quiet: bool = False,
    resume: bool = False,
) -> Dict[str, Path]:
    """The main job: gate -> prepare -> fit -> extract -> texture -> export."""
    from recon.prepare import foreground_mask, load_image, prepare_reference, save_reference

    device = choose_device(cfg.device)
    run_dir = Path(run_dir)
    timer = StageTimer(log)
    if resume:
        # Gated and prepared in the first run: continue from the prepared view.
        from PIL import Image

        rgba = np.asarray(Image.open(run_dir / INPUT_IMAGE).convert("RGBA"), dtype=np.float32) / 255.0
        reference = ReferenceView(torch.from_numpy(rgba))
    else:
        with timer.stage("gate"):
            image = load_image(image_path)
            gate_image(image, cfg, device, record, log)
        with timer.stage("prepare"):
            mask, source = foreground_mask(image, mask_path)
            reference = prepare_reference(image, mask, cfg.prepare.border_ratio, cfg.prepare.size)
            save_reference(reference, run_dir / INPUT_IMAGE)
            record.update(foreground=source)
    with timer.stage("load prior"):
        prior = build_prior(cfg, reference, device)
    with timer.stage("fit"):
        state = fit_or_resume(cfg, device, prior, reference, run_dir, resume, quiet)
    del prior
    _, paths = finish_asset(state, cfg, run_dir, timer)
    record.finish("ok", outputs={k: str(v) for k, v in paths.items()}, stage_seconds=timer.seconds)
    return paths


def self_check(gt_mesh: MeshData, cfg: Config, run_dir: Path, record: RunRecord, log=None, quiet: bool = False, resume: bool = False) -> Dict[str, float]:
    """``--reference-mesh``: reconstruct a known mesh, write metrics.json beside the asset."""
    metrics = reconstruct_reference(gt_mesh, cfg, run_dir, quiet=quiet, resume=resume, log=log)
    write_json_atomic(Path(run_dir) / "metrics.json", metrics)
    record.finish("ok", metrics={k: v for k, v in metrics.items() if k != "stage_seconds"}, stage_seconds=metrics["stage_seconds"])
    return metrics


def reconstruct_object(gt_mesh: MeshData, config: Config, run_dir: Path, prior: str) -> Dict[str, float]:
    """One benchmark object (recon.bench.runner): the self-check, or Zero123 from the rendered input view."""
    if prior == "reference":
        return reconstruct_reference(gt_mesh, config, run_dir, quiet=True)
    from PIL import Image

    from recon.prepare import foreground_mask, prepare_reference

    started = time.monotonic()
    cfg = apply_overrides(config, ["prior.kind=zero123", f"prior.model={prior}"])
    device = choose_device(cfg.device)
    image = Image.open(Path(run_dir) / INPUT_IMAGE).convert("RGBA")
    mask, _ = foreground_mask(image)
    reference = prepare_reference(image, mask, cfg.prepare.border_ratio, cfg.prepare.size)
    timer = StageTimer()
    state = fit_or_resume(cfg, device, build_prior(cfg, reference, device), reference, Path(run_dir), False, True)
    mesh, _ = finish_asset(state, cfg, Path(run_dir), timer)
    truth = ReferencePrior(gt_mesh, cfg.prior, device).true_views(eval_cameras(cfg, device), cfg.eval.resolution, ssaa=2)
    metrics = score_against(gt_mesh, truth, state, mesh, cfg)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    return metrics


def export_only(run_dir: Path, overrides, log=None, quiet: bool = False) -> Dict[str, Path]:
    """Re-export a run from its checkpoint with new extract/texture/export settings, without refitting."""
    run_dir = Path(run_dir)
    payload = read_checkpoint(run_dir / CHECKPOINT_NAME)
    cfg = apply_overrides(from_dict(payload["config"]), list(overrides))
    # The field is rebuilt with the saved config, on the device the overrides choose.
    state, _ = restore_fit_state(payload, choose_device(cfg.device))
    timer = StageTimer(log)
    _, paths = finish_asset(state, cfg, run_dir, timer)
    if (run_dir / "run.json").is_file():
        record = open_record(run_dir)
        record.update(outputs={k: str(v) for k, v in paths.items()}, export_config={k: v for k, v in to_dict(cfg).items() if k in ("extract", "texture", "export")})
    return paths


def resume(run_dir: Path, overrides, record: RunRecord, log=None, quiet: bool = False):
    """Continue an interrupted run from its checkpoint (same mode, same inputs)."""
    run_dir = Path(run_dir)
    cfg = apply_overrides(from_dict(read_checkpoint(run_dir / CHECKPOINT_NAME)["config"]), list(overrides))
    record.update(status="running", resumed=True)
    mode = record.data.get("mode")
    if mode == "reference-mesh":
        gt = load_reference_mesh(Path(record.data["input"]))
        metrics = self_check(gt, cfg, run_dir, record, log=log, quiet=quiet, resume=True)
        return run_dir / "metrics.json"
    if mode == "image":
        paths = reconstruct_image(Path(record.data["input"]), cfg, run_dir, record, log=log, quiet=quiet, resume=True)
        return paths.get("glb", run_dir)
    raise BadInput(f"{run_dir}/run.json does not say what kind of run it was; cannot resume")
