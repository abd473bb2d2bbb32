"""The Python API (recon.reconstruct, recon.novel_views) and the web app's backend and queue, on tiny models."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import recon
from recon.config import load_config
from recon.errors import BadInput, MissingWeights, Refused
from test_cli import FAST, object_photo
from test_gate import embedding, save, tiny_checker

# Even fewer steps than the CLI's FAST: these tests are about plumbing, not quality.
TINY = FAST + ["fit.steps=4", "refine.steps=0", "export.preview_frames=2", "prior.image_size=64"]


def flagging_checker(photo_path: Path, checker_dir: Path, target: Path) -> Path:
    """A checker whose concept 2 is the photo (as composited on white) itself: it flags that photo."""
    from recon.gate import load_safety_gate

    gate = load_safety_gate(str(checker_dir), "cpu")
    image = Image.open(photo_path).convert("RGBA")
    composited = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    checker = tiny_checker()
    checker.concept_embeds.data[2] = embedding(gate, composited.convert("RGB"))
    checker.concept_embeds_weights.data[2] = 0.5
    return save(checker, target)


def app_config(prior_dir, checker_dir, *extra):
    return load_config("cpu", TINY + [f"prior.model={prior_dir}", f"gate.model={checker_dir}", "device=cpu", *extra])


# ----------------------------------------------------------------------------- the Python API


def test_reconstruct_api_reports_progress_and_returns_the_run(workdir, prior_dir, checker_dir):
    seen = []
    result = recon.reconstruct(
        object_photo(workdir / "mug.png"), config="cpu", prior=str(prior_dir), safety_checker=str(checker_dir),
        seed=3, output=workdir / "run", overrides=TINY, progress=lambda *report: seen.append(report),
    )
    assert result.run_dir == workdir / "run"
    assert result.paths["glb"] == workdir / "run" / "model.glb" and result.paths["glb"].is_file()
    assert result.record["status"] == "ok" and result.record["seed"] == 3 and result.record["mode"] == "image"
    assert json.loads((workdir / "run" / "run.json").read_text())["status"] == "ok"
    stages = [stage for stage, *_ in seen]
    assert stages.index("gate") < stages.index("prepare") < stages.index("fit") < stages.index("export")
    fit_steps = [(step, total) for stage, step, total, _ in seen if stage == "fit" and total]
    assert fit_steps[-1] == (4, 4) and [s for s, _ in fit_steps] == sorted(s for s, _ in fit_steps)
    seconds = [s for *_, s in seen]
    assert seconds == sorted(seconds)


def test_novel_views_api_and_its_errors(workdir, prior_dir, checker_dir):
    photo = object_photo(workdir / "mug.png")
    result = recon.novel_views(photo, azimuth=45, samples=2, ddim_steps=1, prior=str(prior_dir), safety_checker=str(checker_dir),
                               config="cpu", overrides=["prior.image_size=64"])
    assert result.run_dir.parent == Path("outputs") and result.run_dir.name.startswith("mug-views-")
    assert sorted(k for k in result.paths if k.startswith("view_")) == ["view_0", "view_1"]
    assert result.record["status"] == "ok" and result.record["views"]["azimuth"] == 45 and result.withheld == []
    with pytest.raises(BadInput, match="--polar must be in -90..90"):
        recon.novel_views(photo, polar=91, prior=str(prior_dir), output=workdir / "bad")
    assert not (workdir / "bad").exists()
    with pytest.raises(BadInput, match="exclude each other"):
        recon.reconstruct(photo, safety_checker=str(checker_dir), no_safety_check=True)


def test_api_refusal_is_raised_and_recorded(workdir, checker_dir):
    photo = object_photo(workdir / "flag me.png")
    flagging = flagging_checker(photo, checker_dir, workdir / "flagging")
    with pytest.raises(Refused) as caught:
        recon.reconstruct(photo, safety_checker=str(flagging), prior=str(workdir / "unused"), output=workdir / "run", config="cpu")
    assert caught.value.exit_code == 3
    assert sorted(p.name for p in (workdir / "run").iterdir()) == ["run.json"]
    assert json.loads((workdir / "run" / "run.json").read_text())["status"] == "refused"


# ----------------------------------------------------------------------------- the app's backend


def test_flagged_upload_leaves_only_the_refusal_record(workdir, prior_dir, checker_dir):
    from recon.app import DemoBackend

    photo = object_photo(workdir / "flag me.png")
    backend = DemoBackend(app_config(prior_dir, flagging_checker(photo, checker_dir, workdir / "flagging")))
    with pytest.raises(Refused, match="flagged"):
        backend.check_upload(str(photo))
    with pytest.raises(Refused):
        backend.novel_views(str(photo), None, 0, 0, 90, 0, 1, 3, 1)  # judged again before generating
    runs = sorted((workdir / "outputs").iterdir())
    assert len(runs) == 2 and all(sorted(p.name for p in run.iterdir()) == ["run.json"] for run in runs)
    record = json.loads((runs[0] / "run.json").read_text())
    assert record["status"] == "refused" and record["mode"] == "upload" and record["safety"]["flagged"] is True


def test_app_fails_closed_without_checker_weights_and_shows_a_banner_when_off(workdir, prior_dir, checker_dir):
    from recon.app import DemoBackend

    photo = str(object_photo(workdir / "mug.png"))
    closed = DemoBackend(app_config(prior_dir, workdir / "no-such-checker"))
    assert "Images are refused" in closed.banner()
    with pytest.raises(MissingWeights, match="safety checker"):
        closed.check_upload(photo)
    off = DemoBackend(app_config(prior_dir, checker_dir, "gate.enabled=false"))
    assert "Safety checker OFF" in off.banner()
    assert off.check_upload(photo).message.startswith("Safety checker off")
    passing = DemoBackend(app_config(prior_dir, checker_dir))
    checked = passing.check_upload(photo)
    assert passing.banner() == "" and "passed" in checked.message and checked.prepared.size == (256, 256)
    assert not (workdir / "outputs").exists()  # a passing check writes nothing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_background(backend):
    """(app, url): ``backend``'s page built and served on a free local port, returning at once."""
    from recon.app import build_app, launch

    app = build_app(backend)
    port = free_port()
    launch(app, backend, "127.0.0.1", port, block=False)
    return app, f"http://127.0.0.1:{port}/"


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stage_of(job) -> str:
    """What a gradio_client job's progress bar says now ("fit: step 2/4, 9 s"); "" before its first report."""
    units = job.status().progress_data or []
    return units[-1].desc if units else ""


def test_two_reconstructions_submitted_at_once_run_one_after_the_other_after_a_failed_one(workdir, prior_dir, checker_dir, monkeypatch):
    pytest.importorskip("gradio", reason="the web app is the optional 'demo' extra; CI installs it")
    from gradio_client import Client, handle_file

    import recon.api
    from recon.app import DemoBackend

    spans, calls, real = [], [], recon.api.reconstruct

    def timed(*args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug in the first job")  # it must free the device for the others
        started = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            spans.append((started, time.monotonic(), threading.current_thread().name))

    monkeypatch.setattr(recon.api, "reconstruct", timed)
    backend = DemoBackend(app_config(prior_dir, checker_dir, "export.preview=false"))  # the run renders the turntable to judge it all the same
    app, url = serve_in_background(backend)
    try:
        client = Client(url, verbose=False)
        photo = handle_file(str(object_photo(workdir / "mug.png")))
        failing = client.submit(photo, None, 0, api_name="/reconstruct")
        assert failing.result(timeout=60)[1].startswith("Internal error: RuntimeError: a bug in the first job")
        jobs = [client.submit(photo, None, 0, api_name="/reconstruct") for _ in range(2)]
        results = [job.result(timeout=240) for job in jobs]
    finally:
        app.close()
    for glb, message, *_ in results:
        assert glb and Path(glb).suffix == ".glb" and Path(glb).stat().st_size > 0, message
        assert message.startswith("Done")
    assert len(spans) == 2
    (start_a, end_a, _), (start_b, end_b, _) = sorted(spans)
    assert end_a <= start_b, "the second reconstruction started before the first finished"
    runs = sorted((workdir / "outputs").iterdir())
    records = [json.loads((run / "run.json").read_text()) for run in runs]
    assert len(runs) == 2 and all(r["status"] == "ok" and r["outputs_checked"]["frames"] > 0 for r in records)


def test_cancelling_a_running_reconstruction_stops_it_and_the_next_in_the_queue_runs(workdir, prior_dir, checker_dir, monkeypatch):
    pytest.importorskip("gradio", reason="the web app is the optional 'demo' extra; CI installs it")
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    import recon.api
    from recon.app import DemoBackend

    spans, real = [], recon.api.reconstruct
    test_over = threading.Event()

    def first_runs_long(*args, **kwargs):
        span = [time.monotonic(), None]
        spans.append(span)
        if len(spans) == 1:
            kwargs["steps"] = 100_000  # runs until cancelled
            given = kwargs["progress"]

            def report(*stage_and_step):
                if test_over.is_set():
                    raise KeyboardInterrupt  # the test failed: stop the run rather than let it go on for hours
                given(*stage_and_step)

            kwargs["progress"] = report
        try:
            return real(*args, **kwargs)
        finally:
            span[1] = time.monotonic()

    monkeypatch.setattr(recon.api, "reconstruct", first_runs_long)
    backend = DemoBackend(app_config(prior_dir, checker_dir))
    app, url = serve_in_background(backend)
    # The page's Cancel button cancels the reconstruction event, as gradio_client's cancel below does.
    (button,) = [block._id for block in app.blocks.values() if block.elem_id == "cancel-button"]
    reconstruct = [fn._id for fn in app.fns.values() if fn.api_name == "reconstruct"]
    assert [fn.cancels for fn in app.fns.values() if fn.is_cancel_function and (button, "click") in fn.targets] == [reconstruct]
    photo = handle_file(str(object_photo(workdir / "mug.png")))
    try:
        # Each user is a client of their own: gradio cancels by session.
        first = Client(url, verbose=False).submit(photo, None, 0, api_name="/reconstruct")
        wait_for(lambda: stage_of(first).startswith("fit"), 60, "the first job to reach the fit")
        second = Client(url, verbose=False).submit(photo, None, 0, api_name="/reconstruct")
        queued = wait_for(lambda: (s := second.status()).code == Status.IN_QUEUE and s.rank is not None and s, 20, "the second job's place")
        assert (queued.rank, queued.queue_size) == (0, 1)  # next in line, one waiting
        (first_run,) = (workdir / "outputs").iterdir()
        cancelled = time.monotonic()
        first.cancel()
        wait_for(lambda: json.loads((first_run / "run.json").read_text())["status"] == "interrupted", 10, "the first run to stop")
        stopped_after = time.monotonic() - cancelled
        glb, message, *_ = second.result(timeout=120)
    finally:
        test_over.set()
        app.close()
    assert stopped_after < 5, f"the cancelled run went on for {stopped_after:.1f} s"
    assert message.startswith("Done") and Path(glb).suffix == ".glb" and Path(glb).stat().st_size > 0, message
    # stopped as Ctrl-C stops a command-line run: resumable from its checkpoint
    record = json.loads((first_run / "run.json").read_text())
    assert record["status"] == "interrupted" and (first_run / "checkpoint.pt").is_file()
    (_, first_ended), (second_started, _) = spans
    assert first_ended <= second_started, "the second job started on the device before the cancelled one had stopped"
    runs = sorted(json.loads((run / "run.json").read_text())["status"] for run in (workdir / "outputs").iterdir())
    assert runs == ["interrupted", "ok"]


class FlagsTurntable:
    """A stand-in checker: passes the photo (96x96), flags the 64x64 turntable frames."""

    def check(self, image):
        from recon.gate import SafetyVerdict

        flagged = image.size == (64, 64)
        return SafetyVerdict(flagged, [0.1 if flagged else -0.5], [], 1.0, "stand-in")


def test_a_flagged_turntable_withholds_the_asset_before_it_is_written(workdir, prior_dir, checker_dir, monkeypatch):
    import recon.gate
    import recon.pipeline
    from recon.app import DemoBackend

    backend = DemoBackend(app_config(prior_dir, checker_dir))
    backend.gate = FlagsTurntable()
    monkeypatch.setattr(recon.gate, "load_safety_gate", lambda *args, **kwargs: FlagsTurntable())  # the run's own checker
    written = []
    monkeypatch.setattr(recon.pipeline, "export_asset", lambda *args, **kwargs: written.append(args) or {})
    with pytest.raises(Refused, match="turntable"):
        backend.reconstruct(str(object_photo(workdir / "mug.png")), None, 0.0)
    assert written == []  # judged before the export, not removed after it
    (run,) = (workdir / "outputs").iterdir()
    left = sorted(p.name for p in run.iterdir())
    assert not {"model.glb", "model.obj", "model_texture.png", "preview.png", "checkpoint.pt"} & set(left), left
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "refused" and record["withheld"].startswith("asset") and not record.get("outputs")
    assert record["outputs_checked"]["frames"] == 2 + 1 and record["outputs_checked"]["flagged"] == [0, 1]


def test_demo_without_gradio_or_without_ray_is_refused_in_one_line(monkeypatch):
    import sys

    from recon.app import serve

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the 'demo' extra were not installed
    with pytest.raises(BadInput, match=r'pip install -e "\.\[demo\]"'):
        serve(load_config("cpu"))
    monkeypatch.undo()
    pytest.importorskip("gradio", reason="the web app is the optional 'demo' extra; CI installs it")
    monkeypatch.setitem(sys.modules, "ray", None)  # --ray-address without the 'bench' extra
    with pytest.raises(BadInput, match=r"need Ray: pip install 'recon\[bench\]'"):
        serve(load_config("cpu"), ray_address="auto")
