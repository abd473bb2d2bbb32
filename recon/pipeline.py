"""The orchestrator: the order of the stages, and the jobs that run them.

    gate -> prepare -> fit -> extract -> texture -> export [-> evaluate]

Every job runs one image path, :func:`reconstruct`. A user's photo
(``--image``), the self-check (``--reference-mesh``) and each benchmark object
differ only in where the photo comes from, which prior the fit is handed
(:mod:`recon.prior`), and whether a truth is there to score against. The
stages themselves live in their own modules; this one only calls them in
order and records what happened (docs/design.md, "Data flow").
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Callable, Dict, Optional

import numpy as np
import torch
from PIL import Image

from recon.config import Config, apply_overrides, from_dict, to_dict
from recon.device import choose_device
from recon.errors import BadInput, Refused
from recon.eval.score import image_scores, mesh_views, score_reconstruction
from recon.eval.truth import eval_cameras, photo_camera, render_photo, truth_views, with_albedo
from recon.fit import new_fit_state, read_checkpoint, reference_camera, restore_fit_state, run_fit
from recon.frames import PhotoCamera, Recentring, Similarity, fit_to_photo_world
from recon.io_utils import remove_stale_partials, save_rgba_png, write_json_atomic
from recon.mesh.data import MeshData, normalize_to_unit_cube
from recon.mesh.export import export_asset
from recon.mesh.extract import CARVE_DEPTH_OPACITY, DepthViews, extract_mesh
from recon.mesh.io import load_mesh
from recon.mesh.preview import Previews, render_previews, save_previews
from recon.mesh.refine import refine_texture
from recon.mesh.texture import bake_texture, bake_vertex_colors, unwrap
from recon.prepare import ReferenceView
from recon.progress import Progress
from recon.render.field_views import carving_views, field_views, surface_colour
from recon.run_record import CHECKPOINT_NAME, INPUT_IMAGE, METRICS_FILE, PHOTO_IMAGE, RunRecord


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


@dataclass
class RunResult:
    paths: Dict[str, Path]  # the written asset files by kind (glb, obj, mtl, texture, mp4/gif, png)
    metrics: Optional[dict] = None  # scored runs only
    stage_seconds: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the image path


def reconstruct(
    photo_path: Path,
    cfg: Config,
    run_dir: Path,
    record: RunRecord,
    *,
    mask_path: Optional[str] = None,
    truth: Optional[MeshData] = None,
    camera: Optional[PhotoCamera] = None,
    check_safety: bool = True,
    log=None,
    quiet: bool = False,
    resume: bool = False,
    check_outputs: bool = False,
) -> RunResult:
    """gate -> prepare -> fit -> extract -> texture -> export, and evaluate when ``truth`` is given.

    ``truth`` (scored runs): the photographed mesh in its photo's world (the
    unit cube); it is what the reference prior knows and what the result is
    scored against. ``camera``: the camera that took the photo; by default the
    preset's camera at ``camera.reference_elevation`` over the photo's height.
    ``check_safety=False`` is for photos recon rendered itself; the record says so.
    ``check_outputs``: the finished asset's turntable and contact sheet pass the
    safety checker too, before any file is written (the web app asks for it).
    """
    started = time.monotonic()
    device = choose_device(cfg.device)
    run_dir = Path(run_dir)
    timer = StageTimer(log)
    if resume:
        # Gated and prepared in the first run: continue from the prepared view.
        reference, camera = _prepared_view(run_dir, record)
    else:
        from recon.prepare import foreground_mask, load_image, prepare_reference, save_reference

        with timer.stage("gate"):
            image = load_image(photo_path)
            if check_safety:
                _gate(image, cfg, device, record)
            else:
                record.update(safety={"checked": False, "note": "the photo is recon's own render of a known mesh"})
        with timer.stage("prepare"):
            mask, source = foreground_mask(image, mask_path)
            reference = prepare_reference(image, mask, cfg.prepare.border_ratio, cfg.prepare.size)
            save_reference(reference, run_dir / INPUT_IMAGE)
            camera = camera or PhotoCamera(cfg.camera.reference_elevation, cfg.camera.distance, cfg.camera.fovy, image.width, image.height)
            record.update(foreground=source, frames=_frames_record(reference.recentring, camera, cfg))
    fit_to_world = fit_to_photo_world(reference.recentring, camera, cfg.camera.distance, cfg.camera.fovy)

    with timer.stage("load prior"):
        prior = _build_prior(cfg, reference, truth, fit_to_world, device)
    with timer.stage("fit"):
        state = _fit_or_resume(cfg, device, prior, reference, run_dir, resume, quiet)
    check = partial(_check_previews, cfg=cfg, device=device, record=record, run_dir=run_dir) if check_outputs and cfg.gate.enabled else None
    asset = finish_asset(state, cfg, run_dir, timer, prior=prior, reference=reference, quiet=quiet, check_previews=check)
    del prior
    paths = asset.paths
    metrics = None
    if truth is not None:
        with timer.stage("evaluate"):
            metrics = evaluate(state, asset.mesh, truth, fit_to_world, cfg, unrefined=asset.unrefined)
        metrics["seconds"] = round(time.monotonic() - started, 2)
        metrics["stage_seconds"] = timer.seconds
        write_json_atomic(run_dir / METRICS_FILE, metrics)
    record.finish(
        "ok",
        outputs={k: str(v) for k, v in paths.items()},
        stage_seconds=timer.seconds,
        refine=_refine_record(cfg, asset),
        **({"metrics": {k: v for k, v in metrics.items() if k != "stage_seconds"}} if metrics else {}),
    )
    return RunResult(paths, metrics, timer.seconds)


def self_check(truth: MeshData, cfg: Config, run_dir: Path, record: RunRecord, log=None, quiet: bool = False, resume: bool = False) -> RunResult:
    """A known mesh through the image path: photograph it, reconstruct the photo, score the asset against it.

    ``truth`` must already be in the unit cube. The photo is taken with the
    evaluation protocol's camera at ``camera.reference_elevation`` and written
    as ``photo.png``; from there the run is exactly a ``--image`` run, with the
    reference prior in place of Zero123 when ``prior.kind=reference``.
    """
    run_dir = Path(run_dir)
    truth = with_albedo(truth)  # photo, prior and scores all see one view-independent appearance
    camera = photo_camera(cfg)
    if not resume:
        save_rgba_png(run_dir / PHOTO_IMAGE, render_photo(truth, camera))
    return reconstruct(run_dir / PHOTO_IMAGE, cfg, run_dir, record, truth=truth, camera=camera, check_safety=False, log=log, quiet=quiet, resume=resume)


def evaluate(state, mesh: MeshData, truth: MeshData, fit_to_world: Similarity, cfg: Config, unrefined: Optional[MeshData] = None) -> dict:
    """Scores of the exported mesh and of the field's own renders, both in the truth's frame.

    With ``unrefined`` (the mesh as baked), its image scores too, as ``psnr_before_refine`` and so on.
    """
    def in_world(m: MeshData) -> MeshData:
        return m.to("cpu").with_vertices(fit_to_world.apply(m.vertices.cpu()))

    field_images = field_views(state.field, state.occupancy, eval_cameras(cfg.eval), cfg.eval.resolution, cfg.render, fit_to_world.inverse())
    truth_images = truth_views(truth.to(field_images.device), cfg.eval)
    scores = score_reconstruction(in_world(mesh), field_images, truth, truth_images, cfg.eval, cfg.eval.protocol, cfg.seed)
    if unrefined is not None:
        before = image_scores(mesh_views(in_world(unrefined).to(truth_images.device), cfg.eval), truth_images)
        scores.update({f"{name}_before_refine": value for name, value in before.items()})
    scores["faces"] = int(mesh.faces.shape[0])
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in scores.items()}


@dataclass
class Asset:
    mesh: MeshData  # the exported mesh, in the fit's frame
    paths: Dict[str, Path]  # written files by kind
    unrefined: Optional[MeshData] = None  # the mesh as baked, when refinement changed it
    refine_stats: Dict[str, float] = field(default_factory=dict)


def finish_asset(state, cfg: Config, run_dir: Path, timer: StageTimer, prior=None, reference: Optional[ReferenceView] = None, quiet: bool = True,
                 check_previews: Optional[Callable[[Previews], None]] = None) -> Asset:
    """Fitted field -> mesh -> texture -> refinement (with a prior and the reference view) -> files.

    ``check_previews`` sees the asset's pictures before any file is written,
    and may refuse them by raising (the web app's output check).
    """
    with timer.stage("extract"):
        cameras, distance, opacity = carving_views(
            state.field, state.occupancy, cfg.camera.elevation_range, cfg.camera.distance, cfg.camera.fovy,
            cfg.extract.carve_views_resolution, cfg.render, CARVE_DEPTH_OPACITY,
        )
        mesh = extract_mesh(state.field.density, state.field.radius, cfg.extract, views=DepthViews(cameras, distance, opacity))

    def albedo(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        return surface_colour(state.field, points, normals, cfg.texture.bake_depth)

    with timer.stage("texture"):
        if cfg.texture.mode == "vertex":
            mesh = bake_vertex_colors(mesh, albedo, normals=True)
        else:
            mesh = bake_texture(unwrap(mesh, cfg.texture.size, cfg.texture.padding), albedo, cfg.texture.size, cfg.texture.padding, normals=True)
    unrefined, refine_stats = None, {}
    if prior is not None and reference is not None and cfg.refine.steps > 0 and mesh.has_texture:
        with timer.stage("refine"):
            unrefined = mesh
            rgb, alpha = reference.at(cfg.refine.resolution, background=tuple(cfg.render.background))
            mesh, refine_stats = refine_texture(
                mesh, prior, rgb[None], reference_camera(cfg, mesh.device), cfg.refine, cfg.camera,
                prior_step=cfg.prior.t_anneal_steps, background=cfg.render.background, seed=cfg.seed,
                progress=Progress(cfg.refine.steps + (cfg.refine.vertex_steps if cfg.refine.vertex_offsets else 0), "refine", quiet=quiet), reference_alpha=alpha[None],
            )
    mesh = mesh.to("cpu")
    with timer.stage("export"):
        previews = None
        if cfg.export.preview or check_previews is not None:
            previews = render_previews(mesh, frames=cfg.export.preview_frames, resolution=cfg.export.preview_resolution)
        if check_previews is not None:
            check_previews(previews)
        paths = export_asset(mesh, run_dir, formats=tuple(cfg.export.formats))
        if cfg.export.preview:
            paths.update(save_previews(previews, run_dir))
    return Asset(mesh, paths, unrefined.to("cpu") if unrefined is not None else None, refine_stats)


# ----------------------------------------------------------------------------- runs of an existing run directory


# What a checkpoint does not depend on, and so what --export-only and --resume
# may override; anything else (the field's shape, the cameras, the prior...)
# would not match the saved state or the run it continues.
EXPORT_MAY_CHANGE = ("device", "render.chunk_rays", "extract", "texture", "refine", "export", "eval")
RESUME_MAY_CHANGE = EXPORT_MAY_CHANGE + ("fit.steps", "fit.checkpoint_every")


EXPORT_STAGING = ".export.partial"  # a folder in the run directory, removed whatever happens
ASSET_FILES = ("model.glb", "model.obj", "model.mtl", "model_texture.png", "preview.mp4", "preview.gif", "preview.png")


def _replace_asset_set(staged: Dict[str, Path], run_dir: Path) -> Dict[str, Path]:
    """Move the staged files into ``run_dir`` and drop the earlier set's files the new one lacks.

    Ctrl-C and SIGTERM wait until the renames are done (microseconds), so the
    directory holds one whole set at every moment a signal can land.
    """
    import signal
    import threading

    deferred = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
        for number in (signal.SIGINT, signal.SIGTERM):
            handlers[number] = signal.signal(number, lambda signum, frame: deferred.append(signum))
    try:
        paths = {kind: run_dir / path.name for kind, path in staged.items()}
        for kind, path in staged.items():
            os.replace(path, paths[kind])
        new_names = {path.name for path in paths.values()}
        for name in ASSET_FILES:
            if name not in new_names:
                (run_dir / name).unlink(missing_ok=True)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if deferred:
        raise KeyboardInterrupt
    return paths


def check_photo_inputs(photo_path: Path, mask_path: Optional[str], cfg: Config) -> None:
    """Decode and prepare the photo (and mask) once, cheaply, so that an unusable
    input is refused before any model loads or a run directory is made."""
    from recon.prepare import foreground_mask, load_image, prepare_reference

    image = load_image(photo_path)
    mask, _ = foreground_mask(image, mask_path)
    prepare_reference(image, mask, cfg.prepare.border_ratio, cfg.prepare.size)


def export_only(run_dir: Path, overrides, log=None, quiet: bool = False) -> Dict[str, Path]:
    """Re-export a run from its checkpoint with new extract/texture/export settings, without refitting."""
    run_dir = Path(run_dir)
    payload = read_checkpoint(run_dir / CHECKPOINT_NAME)
    cfg = apply_overrides(from_dict(payload["config"]), list(overrides), EXPORT_MAY_CHANGE, "in --export-only")
    remove_stale_partials(run_dir)
    # The field is rebuilt with the saved config, on the device the overrides choose.
    device = choose_device(cfg.device)
    state, _ = restore_fit_state(payload, device)
    prior, reference = _refinement_inputs(run_dir, cfg, device) if cfg.refine.steps > 0 else (None, None)
    # The new asset is written aside and moved in as one set, so that an
    # interrupted export leaves the earlier set whole, never a mix of both.
    staging = run_dir / EXPORT_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        asset = finish_asset(state, cfg, staging, StageTimer(log), prior=prior, reference=reference, quiet=quiet)
        paths = _replace_asset_set(asset.paths, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (run_dir / "run.json").is_file():
        record = RunRecord.load(run_dir)
        record.update(
            outputs={k: str(v) for k, v in paths.items()},
            export_config={k: v for k, v in to_dict(cfg).items() if k in ("extract", "texture", "refine", "export")},
            refine=_refine_record(cfg, asset),
        )
    return paths


def resume(run_dir: Path, overrides, record: RunRecord, log=None, quiet: bool = False) -> RunResult:
    """Continue an interrupted run from its checkpoint (same mode, same inputs)."""
    run_dir = Path(run_dir)
    cfg = apply_overrides(from_dict(read_checkpoint(run_dir / CHECKPOINT_NAME)["config"]), list(overrides), RESUME_MAY_CHANGE, "on --resume")
    remove_stale_partials(run_dir)
    record.update(status="running", resumed=True)
    mode = record.data.get("mode")
    if mode == "reference-mesh":
        truth = normalize_to_unit_cube(load_mesh(record.data["input"]))[0]
        return self_check(truth, cfg, run_dir, record, log=log, quiet=quiet, resume=True)
    if mode == "image":
        return reconstruct(Path(record.data["input"]), cfg, run_dir, record, log=log, quiet=quiet, resume=True)
    raise BadInput(f"{run_dir}/run.json does not say what kind of run it was; cannot resume")


# ----------------------------------------------------------------------------- helpers of the stages above


def _refine_record(cfg: Config, asset: Asset) -> dict:
    """What run.json says of refinement: its settings, and its losses when it ran."""
    return {"settings": to_dict(cfg)["refine"], "ran": asset.unrefined is not None, **asset.refine_stats}


def _refinement_inputs(run_dir: Path, cfg: Config, device):
    """(prior, reference view) for refining an existing run's asset again (``--export-only``)."""
    record = RunRecord.load(run_dir)
    reference, camera = _prepared_view(run_dir, record)
    fit_to_world = fit_to_photo_world(reference.recentring, camera, cfg.camera.distance, cfg.camera.fovy)
    truth = None
    if cfg.prior.kind == "reference" and record.data.get("mode") == "reference-mesh":
        truth = with_albedo(normalize_to_unit_cube(load_mesh(record.data["input"]))[0])
    return _build_prior(cfg, reference, truth, fit_to_world, device), reference


def _gate(image, cfg: Config, device, record: RunRecord) -> None:
    from recon.gate import gate_image

    if not cfg.gate.enabled:
        record.update(safety={"checked": False, "note": "disabled with --no-safety-check"})
        return
    verdict = gate_image(image, cfg.gate, device)
    record.update(safety={"checked": True, **verdict.to_dict()})
    verdict.raise_if_flagged()


def _check_previews(previews: Previews, cfg: Config, device, record: RunRecord, run_dir: Path) -> None:
    """Every picture of the finished asset through the safety checker, before any of its files is written.

    A flagged asset is withheld: nothing is exported, the checkpoint goes too
    (``--export-only`` would make the same asset again), and run.json says why.
    """
    from recon.gate import gate_from_config

    gate = gate_from_config(cfg.gate, device)
    images = previews.images()
    flagged = [index for index, image in enumerate(images) if gate.check(Image.fromarray(image)).flagged]
    record.update(outputs_checked={"frames": len(images), "flagged": flagged})
    if flagged:
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        record.update(withheld="asset: the safety checker flagged its turntable frames")
        raise Refused("the safety checker flagged the finished asset's turntable; it is withheld (recorded in run.json)")


def _frames_record(recentring: Recentring, camera: PhotoCamera, cfg: Config) -> dict:
    fit_to_world = fit_to_photo_world(recentring, camera, cfg.camera.distance, cfg.camera.fovy)
    return {"photo_camera": camera.to_dict(), "recentring": recentring.to_dict(), "fit_to_photo_world": fit_to_world.to_dict()}


def _prepared_view(run_dir: Path, record: RunRecord):
    """The prepared view and the photo's camera of a run being resumed."""
    frames = record.data.get("frames")
    if not frames:
        raise BadInput(f"{run_dir}/run.json has no record of the prepared view's frames; cannot resume")
    rgba = np.asarray(Image.open(run_dir / INPUT_IMAGE).convert("RGBA"), dtype=np.float32) / 255.0
    return ReferenceView(torch.from_numpy(rgba), Recentring(**frames["recentring"])), PhotoCamera(**frames["photo_camera"])


def _build_prior(cfg: Config, reference: ReferenceView, truth: Optional[MeshData], fit_to_world: Similarity, device):
    """The prior the fit gets: Zero123, or the reference prior of the truth, moved into the fit's frame."""
    if cfg.prior.kind == "reference":
        from recon.prior.reference import ReferencePrior

        if truth is None:
            if not cfg.prior.reference_mesh:
                raise BadInput("prior.kind=reference needs the true mesh: prior.reference_mesh=PATH (or use --reference-mesh)")
            truth = with_albedo(normalize_to_unit_cube(load_mesh(cfg.prior.reference_mesh))[0])
        # Built through the inverse of the map that scores the result: a wrong map fits a wrong object.
        truth_in_fit = truth.with_vertices(fit_to_world.inverse().apply(truth.vertices))
        return ReferencePrior(truth_in_fit, cfg.prior, device, background=tuple(cfg.render.background), seed=cfg.seed)
    from recon.prior.zero123 import Zero123Prior

    return Zero123Prior(cfg.prior, reference, reference_camera(cfg), device, seed=cfg.seed)


def _fit_or_resume(cfg: Config, device, prior, reference: ReferenceView, run_dir: Path, resume: bool, quiet: bool):
    checkpoint = run_dir / CHECKPOINT_NAME
    if resume and checkpoint.is_file():
        state, _ = restore_fit_state(read_checkpoint(checkpoint), device)  # the resume's own cfg drives the rest
    else:
        state = new_fit_state(cfg, device)
    run_fit(state, prior, reference, cfg, checkpoint_path=checkpoint, quiet=quiet)
    return state
