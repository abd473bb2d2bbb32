"""The command a user runs: exit codes, messages, the run directory and run.json, end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recon.fit
from recon.bench.procedural import crate, save_obj
from recon.cli import main
from test_gate import embedding, save, tiny_checker

# Small enough that a whole run takes seconds on a CPU.
FAST = [
    "fit.steps=12",
    "fit.checkpoint_every=5",
    "camera.resolutions=[32]",
    "camera.reference_resolution=64",
    "fit.reference_rays=256",
    "render.n_samples_per_ray=48",
    "extract.resolution=40",
    "texture.size=64",
    "export.preview_frames=4",
    "export.preview_resolution=64",
    "refine.steps=3",
    "refine.n_views=4",
    "refine.resolution=32",
]


def object_photo(path: Path, size=96) -> Path:
    """An orange ellipse with a blue band on a transparent background."""
    y, x = np.mgrid[0:size, 0:size] / size
    inside = ((x - 0.5) / 0.3) ** 2 + ((y - 0.55) / 0.38) ** 2 < 1
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 230, 140, 40
    rgba[(np.abs(y - 0.5) < 0.06)] = [40, 60, 200, 0]
    rgba[..., 3] = inside * 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def run(*argv):
    return main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    """The one error line (stage lines and loading bars may come before it, no traceback after)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    return errors[0]


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tiny_png(path: Path) -> Path:
    Image.new("RGB", (4, 4)).save(path)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: d, "directory"),
        (lambda d: written(d / "empty.png", b""), "empty"),
        (lambda d: written(d / "text.png", b"not an image"), "cannot read image"),
        (lambda d: tiny_png(d / "tiny.png"), "too small"),
    ],
)
def test_bad_image_exits_2_and_writes_nothing(workdir, capsys, make, message):
    assert run("--image", make(workdir), "--config", "cpu") == 2
    assert message in one_error_line(capsys)
    assert not (workdir / "outputs").exists()


@pytest.mark.parametrize("extra,message", [(["--config", "nope"], "unknown config preset"), (["fit.stepz=1"], "invalid config"), (["fit.steps"], "malformed override")])
def test_bad_config_exits_2(workdir, capsys, extra, message):
    image = object_photo(workdir / "mug.png")
    assert run("--image", image, *extra) == 2
    assert message in one_error_line(capsys)
    assert not (workdir / "outputs").exists()


def test_existing_run_is_never_overwritten(workdir, capsys):
    image = object_photo(workdir / "mug.png")
    earlier = workdir / "earlier"
    earlier.mkdir()
    (earlier / "model.glb").write_bytes(b"precious")
    assert run("--image", image, "--output", earlier, "--no-safety-check") == 2
    assert "already exists" in one_error_line(capsys)
    assert (earlier / "model.glb").read_bytes() == b"precious"


def test_flagged_image_is_refused_with_only_run_json(workdir, capsys, checker_dir):
    from recon.gate import load_safety_gate

    image_path = object_photo(workdir / "flag me.png")
    image = Image.open(image_path)
    gate = load_safety_gate(str(checker_dir), "cpu")
    checker = tiny_checker()
    composited = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    checker.concept_embeds.data[2] = embedding(gate, composited.convert("RGB"))
    checker.concept_embeds_weights.data[2] = 0.5
    flagging = save(checker, workdir / "flagging")
    out = workdir / "run"
    assert run("--image", image_path, "--safety-checker", flagging, "--prior", "unused", "--output", out) == 3
    assert "flagged" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "refused" and record["safety"]["flagged"] is True


def test_safety_checker_fails_closed(workdir, capsys):
    image = object_photo(workdir / "mug.png")
    assert run("--image", image, "--safety-checker", workdir / "no-such-checker", "--output", workdir / "run") == 4
    line = one_error_line(capsys)
    assert "safety" in line.lower()
    assert json.loads((workdir / "run" / "run.json").read_text())["status"] == "failed"


def test_missing_prior_exits_4(workdir, capsys):
    image = object_photo(workdir / "mug.png")
    assert run("--image", image, "--no-safety-check", "--prior", workdir / "no-such-model", "--config", "cpu", "--output", workdir / "run", *FAST) == 4
    assert "Zero123" in capsys.readouterr().err


def test_image_run_end_to_end_then_export_only(workdir, capsys, prior_dir, checker_dir):
    image = object_photo(workdir / "my mug ü.png")
    out = workdir / "run"
    code = run("--image", image, "--prior", prior_dir, "--safety-checker", checker_dir, "--config", "cpu", "--output", out, "--seed", 3, "--quiet", *FAST)
    assert code == 0, capsys.readouterr().err
    for name in ("model.glb", "model.obj", "model.mtl", "model_texture.png", "input.png", "preview.png", "checkpoint.pt", "run.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["seed"] == 3 and record["safety"]["flagged"] is False
    assert record["config"]["fit"]["steps"] == 12 and record["versions"]["torch"]
    assert {"gate", "prepare", "fit", "extract", "texture", "export"} <= set(record["stage_seconds"])
    assert not list(out.glob("*.partial*"))

    import trimesh

    before = (out / "model.glb").stat().st_mtime_ns
    assert run("--export-only", out, "texture.size=32", "export.preview=false") == 0
    assert (out / "model.glb").stat().st_mtime_ns != before
    reloaded = trimesh.load(out / "model.glb")
    mesh = next(iter(reloaded.geometry.values()))
    assert mesh.visual.material.baseColorTexture.size == (32, 32)


def test_opt_out_is_warned_and_recorded(workdir, capsys, prior_dir):
    image = object_photo(workdir / "mug.png")
    out = workdir / "run"
    assert run("--image", image, "--prior", prior_dir, "--no-safety-check", "--config", "cpu", "--output", out, "--quiet", *FAST, "export.preview=false") == 0
    assert "safety checker is disabled" in capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["safety"]["checked"] is False and record["weights"]["safety_checker"] is None


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(workdir, capsys, prior_dir, monkeypatch):
    image = object_photo(workdir / "mug.png")
    out = workdir / "run"
    real_step = recon.fit.fit_step

    def interrupted_step(state, *args, **kwargs):
        if state.step == 7:
            raise KeyboardInterrupt
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(recon.fit, "fit_step", interrupted_step)
    assert run("--image", image, "--prior", prior_dir, "--no-safety-check", "--config", "cpu", "--output", out, "--quiet", *FAST) == 130
    assert "--resume" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 7
    assert not (out / "model.glb").exists()

    monkeypatch.setattr(recon.fit, "fit_step", real_step)
    assert run("--resume", out, "--quiet") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["resumed"] is True
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 12
    assert (out / "model.glb").is_file()


def test_reference_mesh_self_check(workdir, capsys):
    mesh_path = save_obj(crate(), workdir / "crate")
    out = workdir / "check"
    assert run("--reference-mesh", mesh_path, "--config", "cpu", "--output", out, "--quiet", *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # A fit of a few steps is rough, but it has found the crate: far closer than
    # an empty guess, and every score in its range. (Quality at the real preset:
    # tests/test_image_path.py.)
    assert 0 < metrics["chamfer"] < 0.1 and 0 < metrics["volume_iou"] <= 1 and 0 < metrics["fscore"] <= 1
    assert 5 < metrics["psnr"] < 60 and 5 < metrics["field_psnr"] < 60 and 0 < metrics["ssim"] <= 1
    assert metrics["seconds"] >= sum(metrics["stage_seconds"].values()) * 0.99
    assert (out / "model.glb").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "ok"
