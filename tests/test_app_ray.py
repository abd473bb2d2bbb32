"""The web app with a Ray address (``launch.py --demo --ray-address ADDR``): reconstructions as Ray tasks, on tiny models.

One local Ray cluster of one CPU serves the whole module, so the cluster runs
one reconstruction at a time and a second user has to queue. Its task worker
stays warm between the tests; the test that kills a worker comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from test_app import app_config, serve_in_background, stage_of, wait_for
from test_cli import object_photo

# A Ray cluster's start and its warm-up take most of a minute on two cores: the slow tier (CI runs it).
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray is the optional 'bench' extra; CI installs it")
pytest.importorskip("gradio", reason="the web app is the optional 'demo' extra; CI installs it")

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_cpu_cluster():
    """A local Ray cluster with one CPU; workers can import this module (for the dying task below)."""
    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)])}})
    yield
    ray.shutdown()


def backend_on(prior_dir, checker_dir, *overrides):
    from recon.app import DemoBackend

    # This process is connected already, so the backend uses that cluster; "auto" is what a user
    # would pass for a cluster started with `ray start --head` on the same machine.
    return DemoBackend(app_config(prior_dir, checker_dir, *overrides), ray_address="auto")


def test_a_reconstruction_runs_as_a_ray_task_and_lands_a_complete_run(workdir, prior_dir, checker_dir, one_cpu_cluster, monkeypatch):
    import recon.api

    def not_here(*args, **kwargs):
        raise AssertionError("the reconstruction ran in the app's process, not as a Ray task")

    monkeypatch.setattr(recon.api, "reconstruct", not_here)  # the worker's process has the real one
    backend = backend_on(prior_dir, checker_dir)
    assert backend.cluster_slots == 1
    seen = []
    photo = object_photo(workdir / "mug.png")
    result, obj_zip = asyncio.run(backend.reconstruct_on_cluster(str(photo), None, 0.0, progress=lambda *report: seen.append(report)))

    (run,) = (workdir / "outputs").iterdir()
    assert result.run_dir == run.resolve() and obj_zip == run.resolve() / "model_obj.zip"
    # A command-line run's files (the turntable as mp4, or gif without an H.264 encoder), and the app's zip.
    names = {p.name for p in run.iterdir()} - {"preview.mp4", "preview.gif"}
    assert names == {"run.json", "input.png", "checkpoint.pt", "model.glb", "model.obj", "model.mtl", "model_texture.png", "preview.png", "model_obj.zip"}
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok" and record["mode"] == "image" and record["input"] == str(photo.resolve())
    assert record["command"] == sys.argv  # the app's command, as for a reconstruction in its own process
    assert record["safety"]["flagged"] is False and record["outputs_checked"]["frames"] > 0
    assert set(record["outputs"]) >= {"glb", "obj"} and record["stage_seconds"]["fit"] > 0
    # The worker's reports, through the progress board. The app polls the latest one twice a second,
    # so a short stage may be missed, but those it sees come in the pipeline's order.
    stages = [stage for stage, *_ in seen if stage != "waiting for the cluster"]
    order = ["gate", "prepare", "load prior", "fit", "extract", "texture", "refine", "export"]
    assert stages and set(stages) <= set(order), stages
    assert [order.index(stage) for stage in stages] == sorted(order.index(stage) for stage in stages), stages


def test_demo_with_ray_but_no_address_runs_on_a_local_cluster(prior_dir, checker_dir, one_cpu_cluster, monkeypatch):
    """``--demo --ray`` asks for a local cluster as the benchmark's --ray does (here the test's, already running)."""
    from recon import app, cluster
    from recon.cli import main

    addresses, served, connect = [], [], cluster.connect
    monkeypatch.setattr(cluster, "connect", lambda address: addresses.append(address) or connect(address))
    monkeypatch.setattr(app, "launch", lambda demo, backend, host, port: served.append((demo, backend)))  # no server
    assert main(["--demo", "--ray", "--config", "cpu", "--prior", str(prior_dir), "--safety-checker", str(checker_dir)]) == 0
    ((demo, backend),) = served
    assert addresses == [None]  # connect(None) starts a local cluster when none is running
    assert backend.on_cluster and backend.cluster_slots == 1
    assert [fn.concurrency_id for fn in demo.fns.values() if fn.api_name == "reconstruct"] == ["cluster"]


def test_a_second_user_sees_their_place_and_cancelled_jobs_free_the_cluster(workdir, prior_dir, checker_dir, one_cpu_cluster):
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    # The first job's fit runs until cancelled: on a warm worker the few steps of the tests' config
    # can end between two looks at its progress, and the job with them.
    backend = backend_on(prior_dir, checker_dir, "fit.steps=100000")
    app, url = serve_in_background(backend)
    photo = handle_file(str(object_photo(workdir / "mug.png")))
    try:
        # Each user is a client of their own: gradio cancels by session.
        first = Client(url, verbose=False).submit(photo, None, 0, api_name="/reconstruct")
        wait_for(lambda: stage_of(first).startswith("fit"), 60, "the first job to reach the fit on the cluster")
        backend.cfg = app_config(prior_dir, checker_dir)  # read as each job starts: the later ones take a few steps
        second = Client(url, verbose=False).submit(photo, None, 0, api_name="/reconstruct")
        queued = wait_for(lambda: (s := second.status()).code == Status.IN_QUEUE and s.rank is not None and s, 20, "the second job's place")
        assert (queued.rank, queued.queue_size) == (0, 1)  # next in line, one waiting
        second.cancel()
        first.cancel()  # a running Ray task: cancelled as Ctrl-C stops a command-line run
        third = Client(url, verbose=False).submit(photo, None, 0, api_name="/reconstruct")
        glb, message, *_ = third.result(timeout=120)
    finally:
        app.close()
    assert message.startswith("Done") and Path(glb).suffix == ".glb" and Path(glb).stat().st_size > 0, message
    runs = sorted((json.loads((run / "run.json").read_text())["status"], run) for run in (workdir / "outputs").iterdir())
    # the first stopped where it was, with its checkpoint kept for --resume; the second never ran
    assert [status for status, _ in runs] == ["interrupted", "ok"] and (runs[0][1] / "checkpoint.pt").is_file()


def dies_after_claiming_its_run(board, job, command, photo, options):
    """A stand-in task whose worker dies mid-run: the run directory is claimed, run.json says "running"."""
    from recon.cli import claim_run_dir
    from recon.run_record import new_record

    new_record(claim_run_dir(options["output"], "unused"), options["config"], mode="image", input=photo)
    os._exit(1)


def test_a_worker_that_dies_fails_its_job_in_one_line_and_the_server_stays_up(workdir, prior_dir, checker_dir, one_cpu_cluster):
    from gradio_client import Client, handle_file

    from recon import cluster

    backend = backend_on(prior_dir, checker_dir)
    backend._task = cluster.remote_task(dies_after_claiming_its_run)
    app, url = serve_in_background(backend)
    try:
        client = Client(url, verbose=False)
        photo = handle_file(str(object_photo(workdir / "mug.png")))
        answers = [client.predict(photo, None, 0, api_name="/reconstruct")[1] for _ in range(2)]  # the slot is free again
    finally:
        app.close()
    for message in answers:
        assert message.startswith("**The reconstruction failed on the Ray cluster:** ray task failed: WorkerCrashedError") and "\n" not in message
    runs = sorted((workdir / "outputs").iterdir())
    records = [wait_for(lambda: (r := json.loads((run / "run.json").read_text()))["status"] != "running" and r, 10, "run.json finished")
               for run in runs]
    assert len(runs) == 2 and all(r["status"] == "failed" and r["error"].startswith("ray task failed: WorkerCrashedError") for r in records)
