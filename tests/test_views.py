"""Novel views (--views): Zero123's own images of other views, conditioned exactly as the SDS prior is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import recon.prior.zero123 as zero123
from recon.config import load_config
from recon.gate import SafetyVerdict
from recon.prepare import foreground_mask, load_image, prepare_reference
from recon.views import NovelViewSampler, request_from, run_novel_views
from test_cli import object_photo, one_error_line, run
from test_gate import embedding, save, tiny_checker

FEW = ["--samples", 2, "--ddim-steps", 1]
SMALL = "prior.image_size=64"  # the tiny UNet's attention at 256x256 costs seconds a step on a CPU


def reference_of(path: Path, size: int = 256):
    image = load_image(path)
    mask, _ = foreground_mask(image)
    return prepare_reference(image, mask, 0.2, size)


def test_views_writes_the_requested_pngs_deterministically(workdir, capsys, prior_dir, checker_dir):
    image = object_photo(workdir / "mug.png")
    common = ["--views", "--image", image, "--prior", prior_dir, "--safety-checker", checker_dir, "--config", "cpu",
              "--polar", 30, "--azimuth", 90, "--seed", 5, "--quiet", *FEW]
    assert run(*common, "--output", workdir / "a") == 0, capsys.readouterr().err
    assert run(*common, "--output", workdir / "b") == 0
    names = sorted(p.name for p in (workdir / "a").iterdir())
    assert names == ["input.png", "run.json", "view_00.png", "view_01.png"]
    for name in ("view_00.png", "view_01.png"):
        view = Image.open(workdir / "a" / name)
        assert view.size == (256, 256) and view.mode == "RGB"
        assert (workdir / "a" / name).read_bytes() == (workdir / "b" / name).read_bytes(), "same seed, same views"
    # two samples of one pose differ: each starts from its own noise
    first, second = (np.asarray(Image.open(workdir / "a" / n), dtype=float) for n in ("view_00.png", "view_01.png"))
    assert np.abs(first - second).mean() > 1
    record = json.loads((workdir / "a" / "run.json").read_text())
    assert record["status"] == "ok" and record["mode"] == "views" and record["safety"]["flagged"] is False
    views = record["views"]
    assert views["polar"] == 30 and views["azimuth"] == 90 and views["samples"] == 2 and views["ddim_steps"] == 1
    assert views["target_camera"]["elevation"] == pytest.approx(0 - 30)  # positive polar moves the camera down
    assert views["outputs_checked"] is True and [r["file"] for r in views["results"]] == ["view_00.png", "view_01.png"]


def test_another_seed_gives_other_views(workdir, prior_dir):
    cfg = load_config("cpu", [f"prior.model={prior_dir}", "device=cpu", SMALL])
    sampler = NovelViewSampler(cfg, reference_of(object_photo(workdir / "mug.png")), "cpu")
    first, again, other = (np.asarray(sampler.sample(request_from(samples=1, ddim_steps=2, seed=s))[0], dtype=float) for s in (5, 5, 6))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again) and np.abs(first - other).mean() > 1


def test_pose_conditioning_is_the_sds_priors(workdir, prior_dir, monkeypatch):
    """The sampler calls the prior's pose_vector (not a copy) with the requested pose, and its
    image embedding, input latent and tokens are those of the prior the fit builds."""
    from recon import pipeline
    from recon.fit import reference_camera
    from recon.frames import PhotoCamera, fit_to_photo_world

    cfg = load_config("cpu", [f"prior.model={prior_dir}", "camera.reference_elevation=10", "device=cpu", SMALL])
    reference = reference_of(object_photo(workdir / "mug.png"))
    sampler = NovelViewSampler(cfg, reference, "cpu")
    request = request_from(polar=30, azimuth=-60, zoom=0.25, samples=2, ddim_steps=2, seed=1)

    calls = []
    real = zero123.pose_vector

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(zero123, "pose_vector", spy)
    views = sampler.sample(request)
    assert len(calls) == 2  # one guided UNet call per DDIM step, each through the prior's pose vector
    (e, a, d, ec, ac, dc), kwargs = calls[0]
    distance = cfg.camera.distance
    torch.testing.assert_close(e, torch.tensor([10.0 - 30.0] * 2))
    torch.testing.assert_close(a, torch.tensor([-60.0] * 2))
    torch.testing.assert_close(d, torch.tensor([distance + 0.25] * 2))
    assert (ec, ac, dc) == (10.0, 0.0, pytest.approx(distance)) and kwargs == {"stable": False}

    # what the function returns is what conditions the views: another function, other views
    monkeypatch.setattr(zero123, "pose_vector", lambda *args, **kwargs: torch.zeros_like(real(*args, **kwargs)))
    altered = sampler.sample(request)
    assert np.abs(np.asarray(altered[0], dtype=float) - np.asarray(views[0], dtype=float)).mean() > 0.5
    monkeypatch.setattr(zero123, "pose_vector", real)

    # the SDS prior exactly as the pipeline builds it for a fit of this photo
    camera = PhotoCamera(cfg.camera.reference_elevation, cfg.camera.distance, cfg.camera.fovy, 96, 96)
    fit_prior = pipeline._build_prior(cfg, reference, None, fit_to_photo_world(reference.recentring, camera, cfg.camera.distance, cfg.camera.fovy), torch.device("cpu"))
    torch.testing.assert_close(sampler.prior.clip_embedding, fit_prior.clip_embedding)
    torch.testing.assert_close(sampler.prior.cond_latent, fit_prior.cond_latent)
    targets = request.cameras(reference_camera(cfg))
    torch.testing.assert_close(sampler.prior.camera_embedding(targets), fit_prior.camera_embedding(targets))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--views", "--polar", 95], "--polar must be in -90..90"),
        (["--views", "--azimuth", -181], "--azimuth must be in -180..180"),
        (["--views", "--zoom", 0.6], "--zoom must be in -0.5..0.5"),
        (["--views", "--samples", 0], "--samples must be in 1..8"),
        (["--views", "--ddim-steps", 0], "--ddim-steps must be in 1..1000"),
        (["--polar", 30], "--polar is only for --views"),
        (["--views", "--prior", "reference"], "novel views need Zero123 weights"),
    ],
)
def test_bad_view_flags_exit_2_and_write_nothing(workdir, capsys, extra, message):
    image = object_photo(workdir / "mug.png")
    assert run("--image", image, "--config", "cpu", *extra) == 2
    assert message in one_error_line(capsys)
    assert not (workdir / "outputs").exists()


def test_flagged_photo_is_refused_before_any_view(workdir, capsys, checker_dir):
    from recon.gate import load_safety_gate

    image_path = object_photo(workdir / "flag me.png")
    gate = load_safety_gate(str(checker_dir), "cpu")
    checker = tiny_checker()
    composited = Image.alpha_composite(Image.new("RGBA", (96, 96), "white"), Image.open(image_path).convert("RGBA"))
    checker.concept_embeds.data[2] = embedding(gate, composited.convert("RGB"))
    checker.concept_embeds_weights.data[2] = 0.5
    flagging = save(checker, workdir / "flagging")
    out = workdir / "run"
    assert run("--views", "--image", image_path, "--safety-checker", flagging, "--prior", workdir / "unused", "--output", out, *FEW) == 3
    assert "flagged" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "refused" and record["mode"] == "views"


class FlagsSecondView:
    """A stand-in gate: passes the photo and every view but the second one it is shown."""

    def __init__(self):
        self.views_seen = 0

    def check(self, image):
        flagged = False
        if image.size == (64, 64):  # a sampled view, not the 96x96 photo
            flagged = self.views_seen == 1
            self.views_seen += 1
        return SafetyVerdict(flagged, [1.0 if flagged else -1.0], [], 1.0, "stand-in")


def test_flagged_views_are_withheld_and_recorded(workdir, prior_dir):
    from recon.run_record import new_record

    cfg = load_config("cpu", [f"prior.model={prior_dir}", "device=cpu", SMALL])
    out = workdir / "run"
    out.mkdir()
    record = new_record(out, cfg, mode="views")
    result = run_novel_views(object_photo(workdir / "mug.png"), cfg, out, record, request_from(samples=3, ddim_steps=2), gate=FlagsSecondView())
    assert result.withheld == [1]
    assert sorted(p.name for p in out.glob("view_*.png")) == ["view_00.png", "view_02.png"]
    saved = json.loads((out / "run.json").read_text())
    assert saved["withheld"] == [1] and saved["views"]["results"][1]["withheld"] is True
    assert "file" not in saved["views"]["results"][1]
