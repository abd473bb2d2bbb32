"""The web app (``launch.py --demo``): upload a photo, see it checked and prepared, draw novel views, build the asset.

Two layers:

* :class:`DemoBackend` does the work of each request with plain Python (the
  safety gate, the prepared view, :func:`recon.api.novel_views`,
  :func:`recon.api.reconstruct`) and knows nothing of gradio, so tests can call it;
* :func:`build_app` lays out the gradio page and maps each event onto the backend.

Safety, as Zero123's model card describes its demo and further: the checker judges
the raw upload when it arrives and again before every generation or
reconstruction; the sampled views and the finished asset's turntable frames are
judged before they are shown. A flagged photo leaves only the refusal's
``run.json`` under ``outputs/`` and clears every output on the page. Without the
checker's weights the app refuses every image (fail closed) and says why.

One device, many users: novel views and reconstructions share one queue slot
(``concurrency_id="device"``, limit 1), so jobs run one after another and
gradio shows each waiting user their place in the queue.
"""

from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image

from recon.errors import BadInput, MissingWeights, ReconError, Refused

DEVICE_QUEUE = "device"
OBJ_ZIP = "model_obj.zip"
CHECKPOINT = "checkpoint.pt"  # recon.pipeline.CHECKPOINT_NAME, named here so importing the app stays light


@dataclass
class Checked:
    """A photo that passed: its prepared view and the verdict's line for the page."""

    prepared: Image.Image  # RGBA, the view the fit and the views see
    message: str


class DemoBackend:
    """The app's work, request by request. ``cfg`` is the server's resolved config."""

    def __init__(self, cfg, outputs: Path = Path("outputs")):
        from recon.device import choose_device

        self.cfg = cfg
        self.outputs = Path(outputs)
        self.device = choose_device(cfg.device)
        self.gate = None
        self.gate_problem: Optional[str] = None
        self._gate_lock = threading.Lock()  # one checker, shared by the request threads
        if cfg.gate.enabled:
            from recon.gate import load_safety_gate

            try:
                self.gate = load_safety_gate(cfg.gate.model, self.device, threshold_scale=cfg.gate.threshold_scale, max_side=cfg.gate.max_side)
            except MissingWeights as error:
                self.gate_problem = str(error)  # shown on the page; every image is refused

    # ------------------------------------------------------------------ the banner

    def banner(self) -> str:
        if not self.cfg.gate.enabled:
            return "**Safety checker OFF** (`--no-safety-check`): uploads are not checked. Runs record this in run.json."
        if self.gate is None:
            return f"**Images are refused: the safety checker could not be loaded.** {self.gate_problem}"
        return ""

    # ------------------------------------------------------------------ safety

    def judge(self, image: Image.Image):
        """The verdict on ``image``, or None with the checker off. Fails closed without weights."""
        if not self.cfg.gate.enabled:
            return None
        if self.gate is None:
            raise MissingWeights(f"the safety checker is not available, so no image is processed: {self.gate_problem}")
        with self._gate_lock:
            return self.gate.check(image)

    def check_upload(self, photo: str, mask: Optional[str] = None) -> Checked:
        """Judge the raw upload, then cut it out and recentre it. A flagged photo: Refused, its record written."""
        from recon.prepare import foreground_mask, load_image, prepare_reference

        image = load_image(photo)
        verdict = self.judge(image)
        if verdict is not None and verdict.flagged:
            self._record_refusal(photo, verdict)
            verdict.raise_if_flagged()
        mask_array, source = foreground_mask(image, mask)
        view = prepare_reference(image, mask_array, self.cfg.prepare.border_ratio, self.cfg.prepare.size)
        pixels = (view.rgba.clamp(0, 1) * 255).round().byte().numpy()
        if verdict is None:
            message = "Safety checker off: the photo was not checked."
        else:
            message = f"Safety check passed (largest concept margin {max(verdict.concept_scores):.3f}; above 0 would be flagged)."
        return Checked(Image.fromarray(pixels, "RGBA"), f"{message} Object found by: {source}.")

    def _record_refusal(self, photo: str, verdict) -> Path:
        """outputs/<stem>-<time>/run.json saying the upload was refused; nothing else is written."""
        from recon.cli import claim_run_dir
        from recon.gate import REFUSAL
        from recon.run_record import new_record

        run_dir = claim_run_dir(str(self._next_dir(Path(photo).stem)), Path(photo).stem)
        record = new_record(run_dir, self.cfg, mode="upload", input=Path(photo).name)
        record.update(safety={"checked": True, **verdict.to_dict()})
        record.finish("refused", error=REFUSAL)
        return run_dir

    def _next_dir(self, stem: str) -> Path:
        import datetime as _dt

        base = self.outputs / f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path

    # ------------------------------------------------------------------ jobs

    def novel_views(self, photo: str, mask: Optional[str], elevation: float, polar: float, azimuth: float, zoom: float,
                    samples: int, guidance: float, ddim_steps: int) -> Tuple[List[Image.Image], str]:
        """The views that passed the checker, and a line saying how many were withheld."""
        from recon import api

        self.check_upload(photo, mask)  # again, before every generation
        result = api.novel_views(
            photo, polar=polar, azimuth=azimuth, zoom=zoom, samples=int(samples), guidance=guidance, ddim_steps=int(ddim_steps),
            config=self.cfg, output=self._next_dir(f"{Path(photo).stem}-views"), mask=mask, elevation=elevation, gate=self._locked_gate(),
        )
        images = [Image.open(path).copy() for kind, path in result.paths.items() if kind.startswith("view_")]
        note = f" {len(result.withheld)} flagged by the safety checker and withheld." if result.withheld else ""
        return images, f"{len(images)} novel view(s) in {result.run_dir}.{note}"

    def reconstruct(self, photo: str, mask: Optional[str], elevation: float, progress=None):
        """Photo -> asset. Returns the api Result and the OBJ zip; the turntable is judged before it is shown."""
        from recon import api

        self.check_upload(photo, mask)  # again, before every reconstruction
        # with the checker on, the turntable is always made: it is what the finished asset is judged by
        checked = ["export.preview=true"] if self.cfg.gate.enabled else []
        result = api.reconstruct(photo, config=self.cfg, output=self._next_dir(Path(photo).stem), mask=mask, elevation=elevation,
                                 progress=progress, overrides=checked)
        self._judge_turntable(result)
        return result, self._obj_zip(result)

    def _locked_gate(self):
        if self.gate is None:
            return None
        backend = self

        class Locked:  # the views run in a worker thread while uploads may be judged
            def check(self, image):
                with backend._gate_lock:
                    return backend.gate.check(image)

        return Locked()

    def _judge_turntable(self, result) -> None:
        """Every turntable frame and the contact sheet through the checker; a flagged asset is withheld.

        The files are already written by the pipeline (it has no hook before its
        export); a flagged asset's files are removed again and the record says so.
        """
        if not self.cfg.gate.enabled:
            return
        frames = list(_turntable_frames(result.paths))
        flagged = [i for i, frame in enumerate(frames) if self.judge(frame).flagged]
        from recon.run_record import RunRecord

        record = RunRecord.load(result.run_dir)
        record.update(outputs_checked={"frames": len(frames), "flagged": flagged})
        if flagged:
            message = "the safety checker flagged the finished asset's turntable; it is withheld (recorded in run.json)"
            # the checkpoint goes too: --export-only would make the same asset again
            for path in [*result.paths.values(), Path(result.run_dir) / CHECKPOINT]:
                Path(path).unlink(missing_ok=True)
            record.finish("refused", withheld="asset: the safety checker flagged its turntable frames", outputs={}, error=message)
            raise Refused(message)
        result.record.update(record.data)

    def _obj_zip(self, result) -> Optional[Path]:
        names = [result.paths[k] for k in ("obj", "mtl", "texture") if k in result.paths]
        if not names:
            return None
        target = Path(result.run_dir) / OBJ_ZIP
        from recon.io_utils import atomic_path

        with atomic_path(target) as temporary:
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in names:
                    archive.write(path, Path(path).name)
        return target


def _turntable_frames(paths):
    """The preview animation's frames and the contact sheet, as RGB images."""
    import imageio.v3 as iio

    for kind in ("mp4", "gif"):
        if kind in paths:
            for frame in iio.imiter(paths[kind]):
                yield Image.fromarray(frame[..., :3])
    if "png" in paths:
        yield Image.open(paths["png"]).convert("RGB")


# ----------------------------------------------------------------------------- the page


def build_app(backend: DemoBackend):
    """The gradio Blocks of the app, with its queue configured (not launched)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a server users upload photos to
    import gradio as gr

    def cleared(message: str, keep_photo: bool = True):
        # every output emptied, the message shown; a refused photo is taken off the page too
        return (gr.update() if keep_photo else None), None, message, [], None, None, None, None

    def on_upload(photo, mask):
        if not photo:
            return cleared("")
        try:
            checked = backend.check_upload(photo, mask)
        except Refused as error:
            return cleared(_say(error), keep_photo=False)
        except ReconError as error:
            return cleared(_say(error))
        return gr.update(), checked.prepared, checked.message, [], None, None, None, None

    def on_views(photo, mask, elevation, polar, azimuth, zoom, samples, guidance, ddim_steps):
        if not photo:
            return [], "Upload a photo first."
        try:
            images, message = backend.novel_views(photo, mask, elevation, polar, azimuth, zoom, samples, guidance, ddim_steps)
        except ReconError as error:
            return [], _say(error)
        except Exception as error:  # a bug must not take the server down; the run's error.log has the traceback
            return [], f"Internal error: {type(error).__name__}: {error}"
        return images, message

    def on_reconstruct(photo, mask, elevation, progress=gr.Progress()):
        if not photo:
            return None, "Upload a photo first.", None, None, None

        def report(stage, step, total, seconds):
            if total:
                progress((step, total), desc=f"{stage}: step {step}/{total}, {seconds:.0f} s")
            else:
                progress(None, desc=f"{stage}, {seconds:.0f} s")

        try:
            result, obj_zip = backend.reconstruct(photo, mask, elevation, progress=report)
        except ReconError as error:
            return None, _say(error), None, None, None
        except Exception as error:  # a failed job frees the device and the server stays up
            return None, f"Internal error: {type(error).__name__}: {error}", None, None, None
        paths = result.paths
        turntable = paths.get("mp4") or paths.get("gif")
        downloads = [str(p) for p in (paths.get("glb"), obj_zip) if p]
        seconds = sum(result.record.get("stage_seconds", {}).values())
        return (str(paths["glb"]) if "glb" in paths else None, f"Done in {seconds:.0f} s: {result.run_dir}",
                str(turntable) if turntable else None, str(paths["png"]) if "png" in paths else None, downloads)

    with gr.Blocks(title="recon: one photo to a 3D asset") as demo:
        gr.Markdown("# recon\nOne photo of an object in, a textured 3D asset out (Zero123 score distillation). "
                    "Every photo, every novel view and every finished asset passes the Stable Diffusion safety checker.")
        banner = backend.banner()
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(type="filepath", label="Photo", image_mode="RGBA", elem_id="photo")
                mask = gr.Image(type="filepath", label="Mask (optional, white = object)", image_mode="L", elem_id="mask")
                elevation = gr.Slider(-90, 90, value=backend.cfg.camera.reference_elevation, step=1, label="Elevation of the photo's camera (degrees)")
            with gr.Column():
                prepared = gr.Image(label="Prepared input view", interactive=False, elem_id="prepared", image_mode="RGBA")
                status = gr.Markdown(elem_id="status")
        with gr.Tab("Novel views"):
            with gr.Row():
                polar = gr.Slider(-90, 90, value=0, step=1, label="Polar (positive moves the camera down)")
                azimuth = gr.Slider(-180, 180, value=90, step=1, label="Azimuth (positive shows the right side)")
                zoom = gr.Slider(-0.5, 0.5, value=0, step=0.05, label="Zoom (positive moves away)")
            with gr.Row():
                samples = gr.Slider(1, 8, value=4, step=1, label="Samples", elem_id="samples")
                guidance = gr.Slider(0, 20, value=3, step=0.5, label="Guidance scale")
                ddim_steps = gr.Slider(1, 200, value=50, step=1, label="DDIM steps", elem_id="ddim-steps")
            views_button = gr.Button("Draw novel views", elem_id="views-button")
            views_status = gr.Markdown(elem_id="views-status")
            gallery = gr.Gallery(label="Novel views", columns=4, elem_id="views")
        with gr.Tab("3D asset"):
            run_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
            run_status = gr.Markdown(elem_id="run-status")
            with gr.Row():
                viewer = gr.Model3D(label="Textured mesh (GLB)", elem_id="viewer")
                turntable = gr.Video(label="Turntable", elem_id="turntable")
            sheet = gr.Image(label="Contact sheet", interactive=False, elem_id="sheet")
            files = gr.File(label="Downloads: GLB, OBJ/MTL/PNG zip", file_count="multiple", interactive=False, elem_id="downloads")

        everything = [photo, prepared, status, gallery, viewer, turntable, sheet, files]
        for event in (photo.upload, photo.clear, mask.upload, mask.clear):
            event(on_upload, [photo, mask], everything, concurrency_limit=4, concurrency_id="checks")
        views_button.click(on_views, [photo, mask, elevation, polar, azimuth, zoom, samples, guidance, ddim_steps], [gallery, views_status],
                           concurrency_id=DEVICE_QUEUE, concurrency_limit=1, api_name="views")
        run_button.click(on_reconstruct, [photo, mask, elevation], [viewer, run_status, turntable, sheet, files],
                         concurrency_id=DEVICE_QUEUE, concurrency_limit=1, api_name="reconstruct")
    demo.queue(default_concurrency_limit=1)
    return demo


def _say(error: ReconError) -> str:
    if isinstance(error, Refused):
        return f"**Refused:** {error}"
    if isinstance(error, MissingWeights):
        return f"**Cannot process images:** {error}"
    return f"**Cannot use this input:** {error}"


def serve(cfg, host: Optional[str] = None, port: Optional[int] = None, ray_address: Optional[str] = None) -> int:
    """``launch.py --demo``: build the app and serve it until Ctrl-C."""
    if ray_address:
        raise BadInput("--ray-address with --demo is not supported yet; reconstructions run on this machine's device")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise BadInput("--demo needs gradio: pip install -e \".[demo]\"") from None
    if cfg.prior.kind != "zero123":
        raise BadInput("--demo needs Zero123 weights (--prior ID_OR_PATH), not the reference prior")
    backend = DemoBackend(cfg)
    if not cfg.gate.enabled:
        import sys

        print("warning: the safety checker is disabled (--no-safety-check); the page shows a banner", file=sys.stderr)
    launch(build_app(backend), backend, host or "127.0.0.1", port or 7860)
    return 0


def launch(app, backend: DemoBackend, host: str, port: int, block: bool = True):
    """Serve ``app``; the run directories under ``outputs/`` may be downloaded, nothing else on disk."""
    backend.outputs.mkdir(parents=True, exist_ok=True)
    return app.launch(server_name=host, server_port=port, show_error=True, allowed_paths=[str(backend.outputs.resolve())],
                      prevent_thread_lock=not block, quiet=not block)
