"""Promises held under hostile input, concurrency and faults: bad input is refused
with exit 2 and one line before any work, runs never share or lose a directory,
resume and export-only never destroy a run, and exit 1 is left to bugs."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recon.fit
import recon.pipeline
from recon.bench.procedural import crate, save_obj
from recon.cli import claim_run_dir, main
from recon.config import load_config
from recon.errors import BadInput

REPO = Path(__file__).resolve().parent.parent

# A self-check small enough to take seconds: it makes the run the resume and export tests start from.
TINY = [
    "fit.steps=6", "fit.checkpoint_every=3", "camera.resolutions=[32]", "camera.reference_resolution=64",
    "fit.reference_rays=256", "render.n_samples_per_ray=48", "extract.resolution=40", "extract.carve_views_resolution=48",
    "texture.size=32", "export.preview=false", "eval.n_views=2", "eval.resolution=64", "eval.n_surface_points=2000",
    "eval.iou_resolution=32", "refine.steps=3", "refine.n_views=4", "refine.resolution=32",
]


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished tiny self-check; tests work on copies of it."""
    root = tmp_path_factory.mktemp("finished")
    mesh = save_obj(crate(), root / "crate")
    assert run("--reference-mesh", mesh, "--config", "cpu", "--output", root / "run", "--quiet", *TINY) == 0
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def photo(path: Path, size=(96, 96), colour=None) -> Path:
    """An orange ellipse on white, or one flat colour."""
    width, height = size
    rgb = np.full((height, width, 3), 255, np.uint8)
    if colour is None:
        y, x = np.mgrid[0:height, 0:width]
        rgb[((x - width / 2) / (0.3 * width)) ** 2 + ((y - height / 2) / (0.35 * height)) ** 2 < 1] = [230, 140, 40]
    else:
        rgb[:] = colour
    Image.fromarray(rgb).save(path)
    return path


# ----------------------------------------------------------------------------- 1, 8: resume and export-only


def test_resume_refuses_an_override_that_changes_the_checkpoint(run_copy, capsys):
    before = snapshot(run_copy)
    assert run("--resume", run_copy, "field.n_levels=4") == 2
    line = one_line_error(capsys)
    assert "field.n_levels cannot change" in line and "fit.steps" in line  # says what may change
    assert snapshot(run_copy) == before


def test_export_only_refuses_fit_keys_and_keeps_the_run(run_copy, capsys):
    before = snapshot(run_copy)
    assert run("--export-only", run_copy, "fit.lr=0.5") == 2
    assert "fit.lr cannot change" in one_line_error(capsys)
    assert run("--export-only", run_copy, "texture.size=100000") == 2  # out of range: refused before work
    assert "texture.size" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_failed_resume_keeps_the_finished_record(run_copy, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise BadInput("the disk went away")

    monkeypatch.setattr(recon.pipeline, "finish_asset", broken)
    assert run("--resume", run_copy, "fit.steps=8", "--quiet") == 2
    record = json.loads((run_copy / "run.json").read_text())
    assert record["status"] == "ok"  # the finished run stays finished
    assert record["last_resume"] == {"status": "failed", "error": "the disk went away"}
    assert (run_copy / "model.glb").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_or_record_is_a_one_line_error(run_copy, capsys, damage):
    checkpoint = run_copy / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint")
    assert run("--export-only", run_copy) == 2
    assert "cannot be read" in one_line_error(capsys)
    assert run("--resume", run_copy) == 2
    one_line_error(capsys)


def test_resume_with_a_missing_or_damaged_record(run_copy, capsys):
    (run_copy / "run.json").write_text("{not json")
    assert run("--resume", run_copy) == 2
    assert "damaged" in one_line_error(capsys)
    (run_copy / "run.json").unlink()
    assert run("--resume", run_copy) == 2
    assert "missing" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 2: one run per directory


def _claim(path, barrier, results):
    barrier.wait()
    try:
        claim_run_dir(str(path), "x")
        results.put("won")
    except BadInput:
        results.put("refused")


def test_two_runs_racing_for_one_output_directory(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(20):
        target = tmp_path / f"out{trial}"
        if trial % 2:
            target.mkdir()  # an empty folder given as --output is claimed the same way
        barrier, results = context.Barrier(2), context.Queue()
        racers = [context.Process(target=_claim, args=(target, barrier, results)) for _ in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        assert sorted(results.get(timeout=5) for _ in racers) == ["refused", "won"], trial
        assert [p.name for p in target.iterdir()] == ["run.json"]  # the loser removed nothing of the winner's


def test_output_holding_a_run_is_refused_untouched(finished_run, capsys):
    before = snapshot(finished_run)
    assert run("--reference-mesh", finished_run.parent / "crate" / "model.obj", "--output", finished_run, "--config", "cpu") == 2
    assert "already holds a run" in one_line_error(capsys)
    assert snapshot(finished_run) == before


# ----------------------------------------------------------------------------- 3, 6, 7: config and inputs checked first


@pytest.mark.parametrize(
    "override, key",
    [
        ("gate.threshold_scale=nan", "gate.threshold_scale"), ("gate.threshold_scale=inf", "gate.threshold_scale"),
        ("gate.threshold_scale=0", "gate.threshold_scale"), ("gate.threshold_scale=100", "gate.threshold_scale"),
        ("extract.resolution=100000", "extract.resolution"), ("extract.resolution=1", "extract.resolution"),
        ("texture.size=1000000", "texture.size"), ("texture.size=0", "texture.size"), ("prepare.size=0", "prepare.size"),
        ("camera.resolutions=[0]", "camera.resolutions"), ("fit.lr=nan", "fit.lr"), ("fit.steps=-5", "fit.steps"),
        ("texture.mode=bogus", "texture.mode"), ("device=tpu", "device"), ("extract.method=marching", "extract.method"),
        ("eval.protocol=mine", "eval.protocol"), ("prior.kind=dream", "prior.kind"), ("field.use_tcnn=always", "field.use_tcnn"),
        ("camera.milestones=[0,5]", "camera.milestones"), ("prior.t_range_end=[0.9,0.1]", "prior.t_range_end"),
    ],
)
def test_out_of_range_values_exit_2_before_anything_is_made(workdir_with_photo, capsys, override, key):
    image = workdir_with_photo / "object.png"
    assert run("--image", image, "--no-safety-check", "--config", "cpu", override) == 2
    assert key in one_line_error(capsys)
    assert not (workdir_with_photo / "outputs").exists()


@pytest.fixture
def workdir_with_photo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "object.png")
    return tmp_path


def test_the_memory_check_refuses_what_cannot_fit(monkeypatch):
    monkeypatch.setattr("recon.config.machine_memory", lambda: 2 * 2**30)
    with pytest.raises(BadInput, match=r"extract.resolution=1024 needs about 16.0 GiB"):
        load_config("cpu", ["extract.resolution=1024"])
    load_config("cpu", ["extract.resolution=256"])  # 0.25 GiB fits


def test_interpolations_never_reach_the_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECON_TEST_SECRET", "hunter2")
    with pytest.raises(BadInput, match="interpolations"):
        load_config("cpu", ["prior.model=${oc.env:RECON_TEST_SECRET}"])
    preset = tmp_path / "mine.yaml"
    preset.write_text("prior:\n  model: ${oc.env:RECON_TEST_SECRET}\n")
    with pytest.raises(BadInput, match="interpolations") as caught:
        load_config(str(preset))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "case",
    ["one colour", "long strip", "wrong-size mask"],
)
def test_unusable_photos_leave_no_run_directory(workdir_with_photo, capsys, case):
    extra = []
    if case == "one colour":
        image = photo(workdir_with_photo / "flat.png", colour=(120, 120, 120))
    elif case == "long strip":
        image = photo(workdir_with_photo / "strip.png", size=(50000, 32))
    else:
        image = workdir_with_photo / "object.png"
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(workdir_with_photo / "mask.png")
        extra = ["--mask", workdir_with_photo / "mask.png"]
    assert run("--image", image, "--no-safety-check", "--config", "cpu", *extra) == 2
    one_line_error(capsys)
    assert not (workdir_with_photo / "outputs").exists()


@pytest.mark.parametrize("case", ["nan vertex", "coincident vertices"])
def test_unusable_reference_meshes_are_refused_before_the_fit(tmp_path, capsys, case):
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    if case == "nan vertex":
        vertices[1, 0] = np.nan
    else:
        vertices[:] = 0.25
    faces = "f 1 2 3\nf 1 3 4\nf 1 2 4\nf 2 3 4\n"
    mesh = tmp_path / "bad.obj"
    mesh.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in vertices) + faces)
    assert run("--reference-mesh", mesh, "--config", "cpu", "--output", tmp_path / "run") == 2
    one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["under a file", "name too long"])
def test_unwritable_output_is_a_one_line_error(workdir_with_photo, capsys, where):
    blocker = workdir_with_photo / "a_file"
    blocker.write_text("x")
    output = blocker / "run" if where == "under a file" else workdir_with_photo / ("n" * 300)
    assert run("--image", workdir_with_photo / "object.png", "--no-safety-check", "--config", "cpu", "--output", output) == 2
    one_line_error(capsys)


def test_full_disk_ends_the_record_as_failed(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.glb"))

    monkeypatch.setattr(recon.pipeline, "export_asset", disk_full)
    mesh = save_obj(crate(), tmp_path / "crate")
    assert run("--reference-mesh", mesh, "--config", "cpu", "--output", tmp_path / "run", "--quiet", *TINY) == 2
    line = one_line_error(capsys)
    assert "No space left on device" in line
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert not list((tmp_path / "run").glob(".*partial*"))


# ----------------------------------------------------------------------------- 5, 9: interruptions


def test_ctrl_c_while_the_prior_loads_offers_no_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recon.pipeline, "_build_prior", interrupted)
    mesh = save_obj(crate(), tmp_path / "crate")
    assert run("--reference-mesh", mesh, "--config", "cpu", "--output", tmp_path / "run", "--quiet", *TINY) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch, capsys):
    real_step = recon.fit.fit_step

    def terminated_step(state, *args, **kwargs):
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(recon.fit, "fit_step", terminated_step)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        mesh = save_obj(crate(), tmp_path / "crate")
        assert run("--reference-mesh", mesh, "--config", "cpu", "--output", tmp_path / "run", "--quiet", *TINY) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "--resume" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] >= 3


def test_export_only_interrupted_keeps_the_earlier_set_and_clears_stale_partials(run_copy, monkeypatch):
    stale = run_copy / ".model.abc123.partial.glb"
    stale.write_bytes(b"x" * 1000)  # what a SIGKILL during a write leaves
    before = snapshot(run_copy)
    real_export = recon.pipeline.export_asset

    def export_then_interrupt(*args, **kwargs):
        real_export(*args, **kwargs)  # the new GLB and OBJ are written (to the staging folder) ...
        raise KeyboardInterrupt  # ... and Ctrl-C lands before the set is complete

    monkeypatch.setattr(recon.pipeline, "export_asset", export_then_interrupt)
    assert run("--export-only", run_copy, "texture.size=16", "--quiet") == 130
    after = snapshot(run_copy)
    assert not stale.exists() and not (run_copy / recon.pipeline.EXPORT_STAGING).exists()
    del before[stale.name]
    assert after == before  # the earlier set, whole

    monkeypatch.setattr(recon.pipeline, "export_asset", real_export)
    assert run("--export-only", run_copy, "texture.size=16", "export.formats=[glb]", "--quiet") == 0
    assert (run_copy / "model.glb").read_bytes() != before["model.glb"]
    assert not (run_copy / "model.obj").exists()  # the earlier set's OBJ is not left beside the new GLB


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    from recon.io_utils import write_json_atomic

    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- exit 1 is for bugs


def test_no_code_path_exits_1_for_a_user_error():
    """Exit 1 comes from one place, the CLI's handler of unexpected exceptions."""
    offenders = []
    for path in sorted((REPO / "recon").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(sys\.)?exit\(\s*1\s*\)|\breturn 1\b|exit_code\s*=\s*1\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    allowed = {"recon/errors.py", "recon/cli.py"}
    assert [o for o in offenders if o.split(":")[0] not in allowed] == []
    cli_lines = [o for o in offenders if o.startswith("recon/cli.py")]
    source = (REPO / "recon" / "cli.py").read_text()
    handler = source[source.index("def _internal_error") :]
    handler = handler[: handler.index("\n\n\n")]
    assert cli_lines and all(o.split(": ", 1)[1] in handler for o in cli_lines)
