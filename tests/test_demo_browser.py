"""The web app in a real browser: headless Debian Chromium driven by Playwright, tiny models, a CPU fit.

Playwright's own browser download is not used (CI cannot reach it): the test
launches the system's ``chromium`` (Debian's package; ``.ci/run`` installs it).
It also refreshes the README's screenshot, ``docs/demo.png``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from test_app import app_config, flagging_checker, serve_in_background
from test_cli import object_photo
from test_gate import save, tiny_checker
from tiny_zero123 import build_tiny_zero123

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("RECON_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"
MAX_SCREENSHOT_BYTES = 200_000
WAIT_MS = 240_000  # a CPU fit on a busy 2-core machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); .ci/run installs it"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_zero123(root / "prior"), save(tiny_checker(), root / "checker")


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        # SwiftShader: WebGL on the CPU, so the 3-D viewer draws without a GPU
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            yield instance
        finally:
            instance.close()


def serve(cfg, outputs: Path):
    from recon.app import DemoBackend

    return serve_in_background(DemoBackend(cfg, outputs=outputs))


def set_slider(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def upload(page, path: Path) -> None:
    page.locator("#photo input[type=file]").set_input_files(str(path))


def test_upload_views_reconstruct_download_in_chromium(browser, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior, checker = models
    cfg = app_config(prior, checker, "export.preview_frames=4")
    app, url = serve(cfg, tmp_path / "outputs")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 1000}, accept_downloads=True)
        page.goto(url)
        upload(page, object_photo(tmp_path / "mug.png"))
        page.locator("#status", has_text="Safety check passed").wait_for(timeout=60_000)
        page.locator("#prepared img").wait_for(timeout=30_000)

        set_slider(page, "samples", 2)
        set_slider(page, "ddim-steps", 2)
        page.locator("#views-button").click()
        page.locator("#views-status", has_text="novel view").wait_for(timeout=120_000)
        assert page.locator("#views img").count() >= 2

        page.get_by_role("tab", name="3D asset").click()
        page.locator("#reconstruct-button").click()
        page.locator("#run-status", has_text="Done").wait_for(timeout=WAIT_MS)
        page.locator("#viewer canvas").wait_for(timeout=60_000)
        wait_for_drawing(page, "#viewer canvas")  # the GLB is on screen, not an empty canvas

        with page.expect_download() as download:
            page.locator('#downloads a[download="model.glb"]').click()
        glb = tmp_path / "downloaded.glb"
        download.value.save_as(glb)
        with page.expect_download() as download:
            page.locator('#downloads a[download="model_obj.zip"]').click()
        download.value.save_as(tmp_path / "downloaded.zip")
        with zipfile.ZipFile(tmp_path / "downloaded.zip") as archive:
            assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model_texture.png"]
        assert glb.read_bytes()[:4] == b"glTF"
        import trimesh

        scene = trimesh.load(glb)
        assert sum(len(g.faces) for g in scene.geometry.values()) > 0

        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        save_small_png(shot, SCREENSHOT)
    finally:
        app.close()
    runs = sorted((tmp_path / "outputs").iterdir())
    records = [json.loads((run / "run.json").read_text()) for run in runs]
    assert sorted(r["mode"] for r in records) == ["image", "views"] and all(r["status"] == "ok" for r in records)


def test_flagged_photo_is_refused_in_chromium_with_nothing_shown(browser, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior, checker = models
    photo = object_photo(tmp_path / "flag me.png")
    cfg = app_config(prior, flagging_checker(photo, checker, tmp_path / "flagging"))
    app, url = serve(cfg, tmp_path / "outputs")
    try:
        page = browser.new_page()
        page.goto(url)
        upload(page, photo)
        page.locator("#status", has_text="Refused").wait_for(timeout=60_000)
        assert "flagged" in page.locator("#status").inner_text()
        page.locator("#photo img").wait_for(state="detached", timeout=30_000)  # the flagged photo is taken off the page
        assert page.locator("#prepared img, #views img, #sheet img, #viewer canvas, #downloads a").count() == 0
        page.locator("#views-button").click()  # nothing to generate from: no view is drawn
        page.locator("#views-status", has_text="Upload a photo first").wait_for(timeout=30_000)
        page.get_by_role("tab", name="3D asset").click()
        page.locator("#reconstruct-button").click()
        page.locator("#run-status", has_text="Upload a photo first").wait_for(timeout=30_000)
        assert page.locator("#views img, #viewer canvas, #downloads a").count() == 0
    finally:
        app.close()
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1 and [p.name for p in runs[0].iterdir()] == ["run.json"], "only the refusal's record"
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "refused"


def wait_for_drawing(page, selector: str, timeout_s: float = 60.0) -> None:
    """Until the element's pixels are no longer one flat colour (the viewer has drawn the mesh)."""
    import time

    import numpy as np

    deadline = time.monotonic() + timeout_s
    while True:
        pixels = np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("L"), dtype=float)
        if pixels.std() > 2.0:
            return
        assert time.monotonic() < deadline, f"{selector} stayed blank"
        time.sleep(0.5)


def save_small_png(image: Image.Image, path: Path) -> None:
    """The screenshot as a palette PNG, halved until it is under MAX_SCREENSHOT_BYTES."""
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=128).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_SCREENSHOT_BYTES or image.width < 400:
            break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
