"""The web app (``launch.py --demo``): upload a photo, see it checked and prepared, draw novel views, build the asset.

Two layers:

* :class:`DemoBackend` does the work of each request with plain Python (the
  safety gate, the prepared view, :func:`recon.api.novel_views`,
  :func:`recon.api.reconstruct`) and knows nothing of gradio, so tests can call it;
* :func:`build_app` lays out the gradio page and maps each event onto the backend.

Safety, as Zero123's model card describes its demo and further: the checker judges
the raw upload when it arrives and again before every generation or
reconstruction; the sampled views and the finished asset's turntable frames are
judged before they are shown or written (the run itself judges the turntable,
``check_outputs``, so a flagged asset never reaches the disk). A flagged photo leaves only the refusal's
``run.json`` under ``outputs/`` and clears every output on the page. Without the
checker's weights the app refuses every image (fail closed) and says why.

One device, many users: novel views and reconstructions share one queue slot
(``concurrency_id="device"``, limit 1), so jobs run one after another and
gradio shows each waiting user their place in the queue. A reconstruction runs
in a worker thread (:meth:`DemoBackend.reconstruct_here`) so that a user's
cancel stops it at its next step, as Ctrl-C stops a command-line run, and the
device is free for the next job as soon as it has stopped. With a Ray address
(``--ray-address``), or a local Ray cluster started for the app (``--ray``),
each reconstruction is a Ray task on the cluster instead
(see :meth:`DemoBackend.reconstruct_on_cluster`); they queue for the cluster's
slots (``concurrency_id="cluster"``, one per GPU, or per CPU without GPUs),
while uploads and novel views stay on this machine.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from PIL import Image

from recon.errors import BadInput, MissingWeights, ReconError, Refused

DEVICE_QUEUE = "device"
CLUSTER_QUEUE = "cluster"
POLL_SECONDS = 0.5  # how often a reconstruction on the cluster asks for its progress
OBJ_ZIP = "model_obj.zip"
CHECKPOINT = "checkpoint.pt"  # recon.pipeline.CHECKPOINT_NAME, named here so importing the app stays light


@dataclass
class Checked:
    """A photo that passed: its prepared view and the verdict's line for the page."""

    prepared: Image.Image  # RGBA, the view the fit and the views see
    message: str


class ClusterTaskFailed(Exception):
    """A reconstruction's Ray task died (worker crash, out of memory, cancelled on the cluster) instead of raising."""


class DemoBackend:
    """The app's work, request by request. ``cfg`` is the server's resolved config.

    ``ray_address``: run reconstructions as tasks on that Ray cluster
    (:meth:`reconstruct_on_cluster`); ``use_ray`` without an address: on a
    local Ray cluster started for the app, as the benchmark's ``--ray`` does;
    neither runs them here (:meth:`reconstruct_here`).
    """

    def __init__(self, cfg, outputs: Path = Path("outputs"), ray_address: Optional[str] = None, use_ray: bool = False):
        from recon.device import choose_device

        self.on_cluster = bool(use_ray or ray_address)
        self.cluster_slots = 0  # reconstructions the cluster runs at once; 0 without a cluster
        if self.on_cluster:
            self._connect(ray_address)  # first: a wrong address is refused before any weights load
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

    def _connect(self, address: Optional[str]) -> None:
        from recon import cluster

        self._started_ray = cluster.connect(address)
        self._task = cluster.remote_task(_reconstruct_task)
        self._board = cluster.progress_board()
        self.cluster_slots = cluster.task_slots()

    def close(self) -> None:
        """Disconnect from the Ray cluster if this backend connected: a cluster at an address stays up, a local one stops."""
        if self.on_cluster and self._started_ray:
            import ray

            ray.shutdown()

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
        """Photo -> asset. Returns the api Result and the OBJ zip; the run judges the turntable before it writes the asset."""
        from recon import api

        self.check_upload(photo, mask)  # again, before every reconstruction
        result = api.reconstruct(photo, config=self.cfg, output=self._next_dir(Path(photo).stem), mask=mask, elevation=elevation,
                                 progress=progress, check_outputs=True)
        return result, self._obj_zip(result)

    async def reconstruct_here(self, photo: str, mask: Optional[str], elevation: float, progress=None):
        """:meth:`reconstruct` in a worker thread of this process, stopped as Ctrl-C stops it when cancelled.

        Cancelling this coroutine (gradio does, when a user cancels) sets a stop
        flag that the run sees at its next progress report (every fit step):
        KeyboardInterrupt is raised there, in the run's own thread, so the run
        ends as a command-line run does on Ctrl-C (run.json "interrupted", the
        checkpoint kept for --resume). The coroutine returns only once the
        thread has ended, so gradio gives the device to the next job only when
        this one has let go of it (and its cancel request, which awaits this
        coroutine, is answered then).
        """
        stop = threading.Event()

        def report(*stage_and_step) -> None:
            if stop.is_set():
                raise KeyboardInterrupt
            if progress is not None:
                progress(*stage_and_step)

        def run():
            try:
                return self.reconstruct(photo, mask, elevation, progress=report)
            except KeyboardInterrupt:
                # Our stop, already recorded by the run. Not raised on: a KeyboardInterrupt
                # reaching the event loop would stop the whole server.
                return None

        job = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            return await asyncio.shield(job)  # a cancel ends the wait, not the thread
        except asyncio.CancelledError:
            stop.set()
            while not job.done():
                try:
                    await asyncio.wait([job])
                except asyncio.CancelledError:
                    pass  # cancelled again: the device is still busy until the thread ends
            if not job.cancelled():
                job.exception()  # read, so that asyncio does not log a run that failed as it stopped
            raise

    async def reconstruct_on_cluster(self, photo: str, mask: Optional[str], elevation: float, progress=None):
        """:meth:`reconstruct` as a Ray task on the cluster; the same run directory and run.json.

        The safety gate judges the upload here before the task is submitted; the
        task's run judges the turntable before it writes the asset. ``progress`` hears the stage and step the
        task posts to the progress board (polled every ``POLL_SECONDS``), and
        ("waiting for the cluster", 0, 0, seconds) until the task's first report.
        Cancelling this coroutine (gradio does, when a user cancels) cancels the
        task as Ctrl-C stops a command-line run: run.json says "interrupted" and
        the task's CPU or GPU is freed. A task that dies raises
        :class:`ClusterTaskFailed`; its run.json is finished here.
        """
        import ray

        await asyncio.to_thread(self.check_upload, photo, mask)  # again, before every reconstruction
        run_dir = self._reserve_dir(Path(photo).stem)
        job = uuid.uuid4().hex
        options = dict(config=self.cfg, output=str(run_dir), mask=None if mask is None else str(Path(mask).resolve()),
                       elevation=elevation, check_outputs=True)
        ref = self._task.remote(self._board, job, list(sys.argv), str(Path(photo).resolve()), options)
        try:
            result = await self._wait_for_task(ref, job, progress)
        except BaseException:
            # Cancelled by a user (gradio cancels this coroutine), or the progress board is
            # gone: no task may run on that nobody waits for (a no-op if it has ended). Not
            # force=True: a KeyboardInterrupt in the task lets the run record itself as
            # "interrupted" and keep its checkpoint for --resume, as Ctrl-C does.
            ray.cancel(ref)
            raise
        finally:
            self._board.forget.remote(job)
            # Whenever the task ends (now, or after a cancel reaches it), tidy what it left.
            ref.future().add_done_callback(lambda future: _settle_run_dir(run_dir, future))
        return result, await asyncio.to_thread(self._obj_zip, result)

    async def _wait_for_task(self, ref, job: str, progress):
        """The task's api.Result; its errors as they would be raised here, or ClusterTaskFailed."""
        import ray.exceptions

        started = time.monotonic()
        finished = asyncio.wrap_future(ref.future())
        while not finished.done():
            await asyncio.wait([finished], timeout=POLL_SECONDS)
            if progress is not None:
                report = await self._board.latest.remote(job)
                progress(*(report or ("waiting for the cluster", 0, 0, time.monotonic() - started)))
        try:
            return finished.result()
        except ray.exceptions.RayTaskError as error:
            # The task raised: the page shows what the same error shows in local mode
            # (a refusal, bad input, or a bug with its traceback in the run's error.log).
            raise (error.cause if isinstance(error.cause, Exception) else error) from None
        except ray.exceptions.RayError as error:
            from recon.cluster import task_failure

            raise ClusterTaskFailed(task_failure(error)) from None

    def _reserve_dir(self, stem: str) -> Path:
        """outputs/<stem>-<time>, made empty now (absolute, for a worker elsewhere).

        Made here, not only named: reconstructions on the cluster run at once, so
        two jobs started in the same second must not be given the same folder.
        The task's run claims it as the command line claims an empty --output.
        """
        while True:
            path = self._next_dir(stem).resolve()
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:
                continue  # another job took it between the look and the make

    def _locked_gate(self):
        if self.gate is None:
            return None
        backend = self

        class Locked:  # the views run in a worker thread while uploads may be judged
            def check(self, image):
                with backend._gate_lock:
                    return backend.gate.check(image)

        return Locked()

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


def _reconstruct_task(board, job: str, command: List[str], photo: str, options: dict):
    """Runs on a Ray worker: :func:`recon.api.reconstruct` of ``photo``, its progress posted to ``board``.

    ``command`` is the app's ``sys.argv``: run.json records it as the command
    that made the run, as it does for a reconstruction in the app's process
    (a Ray worker's own argv means nothing to a reader). A worker runs one task
    at a time, so setting it for the task's length affects no other run.
    """
    from recon import api

    def report(stage: str, step: int, total: int, seconds: float) -> None:
        board.report.remote(job, stage, step, total, seconds)  # not waited for: the fit does not slow down

    argv, sys.argv = sys.argv, list(command)
    try:
        return api.reconstruct(photo, progress=report, **options)
    finally:
        sys.argv = argv
        board.forget.remote(job)  # after any report that reached the board after the app stopped asking


def _settle_run_dir(run_dir: Path, future) -> None:
    """After a cluster task ended: remove its folder if the task never claimed it; finish a run.json left "running".

    A task cancelled before it started leaves the reserved, empty folder; a
    worker that died (crash, out of memory, killed) leaves its record saying
    "running". Runs that ended on their own have recorded how; they are left alone.
    """
    from recon.cluster import task_failure
    from recon.run_record import RunRecord

    if not (run_dir / "run.json").exists():
        try:
            run_dir.rmdir()
        except OSError:
            pass  # not empty: someone's files, left alone
        return
    try:
        record = RunRecord.load(run_dir)
    except ReconError:
        return  # an empty run.json: the worker died as it claimed the folder
    if record.data.get("status") != "running":
        return
    import ray.exceptions

    error = None if future.cancelled() else future.exception()
    status = "interrupted" if isinstance(error, ray.exceptions.TaskCancelledError) else "failed"
    record.finish(status, error=task_failure(error) if error is not None else "the Ray task ended without a result")


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

    def reporter(progress):
        def report(stage, step, total, seconds):
            if total:
                progress((step, total), desc=f"{stage}: step {step}/{total}, {seconds:.0f} s")
            else:
                progress(None, desc=f"{stage}, {seconds:.0f} s")

        return report

    def shown(result, obj_zip):
        paths = result.paths
        turntable = paths.get("mp4") or paths.get("gif")
        downloads = [str(p) for p in (paths.get("glb"), obj_zip) if p]
        seconds = sum(result.record.get("stage_seconds", {}).values())
        return (str(paths["glb"]) if "glb" in paths else None, f"Done in {seconds:.0f} s: {result.run_dir}",
                str(turntable) if turntable else None, str(paths["png"]) if "png" in paths else None, downloads)

    def failed(error: Exception):
        # one line on the page and the run's outputs emptied; the job's slot is free again either way
        if isinstance(error, ReconError):
            message = _say(error)
        elif isinstance(error, ClusterTaskFailed):
            message = f"**The reconstruction failed on the Ray cluster:** {error}"
        else:  # a bug must not take the server down; the run's error.log has the traceback
            message = f"Internal error: {type(error).__name__}: {error}"
        return None, message, None, None, None

    # The cluster's slots, or this machine's device.
    reconstruct = backend.reconstruct_on_cluster if backend.on_cluster else backend.reconstruct_here

    async def on_reconstruct(photo, mask, elevation, progress=gr.Progress()):
        # A coroutine, not a function gradio runs in a thread: a user's cancel reaches
        # it as CancelledError, which stops the run, here or as a Ray task.
        if not photo:
            return None, "Upload a photo first.", None, None, None
        try:
            return shown(*await reconstruct(photo, mask, elevation, progress=reporter(progress)))
        except Exception as error:
            return failed(error)

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
            with gr.Row():
                run_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
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
        queue, limit = (CLUSTER_QUEUE, backend.cluster_slots) if backend.on_cluster else (DEVICE_QUEUE, 1)
        running = run_button.click(on_reconstruct, [photo, mask, elevation], [viewer, run_status, turntable, sheet, files],
                                   concurrency_id=queue, concurrency_limit=limit, api_name="reconstruct")
        # The same cancel as gradio_client's: a waiting job leaves the queue, a running one is stopped.
        cancel_button.click(None, None, None, cancels=[running])
    demo.queue(default_concurrency_limit=1)
    return demo


def _say(error: ReconError) -> str:
    if isinstance(error, Refused):
        return f"**Refused:** {error}"
    if isinstance(error, MissingWeights):
        return f"**Cannot process images:** {error}"
    return f"**Cannot use this input:** {error}"


def serve(cfg, host: Optional[str] = None, port: Optional[int] = None, ray_address: Optional[str] = None, use_ray: bool = False) -> int:
    """``launch.py --demo``: build the app and serve it until Ctrl-C.

    Reconstructions run on the Ray cluster at ``ray_address`` if given, else on a
    local Ray cluster with ``use_ray`` (``--ray``), else in this process.
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise BadInput("--demo needs gradio: pip install -e \".[demo]\"") from None
    if cfg.prior.kind != "zero123":
        raise BadInput("--demo needs Zero123 weights (--prior ID_OR_PATH), not the reference prior")
    backend = DemoBackend(cfg, ray_address=ray_address, use_ray=use_ray)
    try:
        if not cfg.gate.enabled:
            print("warning: the safety checker is disabled (--no-safety-check); the page shows a banner", file=sys.stderr)
        if backend.on_cluster:
            where = f"at {ray_address}" if ray_address else "on a local Ray cluster"
            print(f"reconstructions run as Ray tasks {where}, {backend.cluster_slots} at a time", file=sys.stderr)
        launch(build_app(backend), backend, host or "127.0.0.1", port or 7860)
    finally:
        backend.close()
    return 0


def launch(app, backend: DemoBackend, host: str, port: int, block: bool = True):
    """Serve ``app``; the run directories under ``outputs/`` may be downloaded, nothing else on disk."""
    backend.outputs.mkdir(parents=True, exist_ok=True)
    return app.launch(server_name=host, server_port=port, show_error=True, allowed_paths=[str(backend.outputs.resolve())],
                      prevent_thread_lock=not block, quiet=not block)
