"""Image in: decoding, validation, cut-out sources, recentring, and the saved reference view."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, features

from recon.errors import BadInput
from recon.prepare import (
    ReferenceView,
    foreground_mask,
    load_image,
    prepare_reference,
    save_reference,
    validate_image,
)

RED = (220, 40, 30)


def object_on_background(size=(200, 150), box=(60, 40, 140, 120), colour=RED, background=(235, 235, 235), noise=0):
    """An RGB photo of a textured rectangle on a plain background, and the true mask."""
    width, height = size
    rng = np.random.default_rng(0)
    pixels = np.empty((height, width, 3), np.float64)
    pixels[:] = background
    x0, y0, x1, y1 = box
    stripes = (np.arange(x1 - x0) // 6 % 2)[None, :, None] * 25  # texture, so the object is not flat
    pixels[y0:y1, x0:x1] = np.asarray(colour) - stripes
    pixels += rng.normal(0, noise, pixels.shape)
    truth = np.zeros((height, width), bool)
    truth[y0:y1, x0:x1] = True
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), truth


def cutout(size=(200, 150), box=(60, 40, 140, 120)):
    rgb, truth = object_on_background(size, box)
    rgba = np.dstack([np.asarray(rgb), truth * np.uint8(255)])
    return Image.fromarray(rgba, "RGBA"), truth


def alpha_box(view: ReferenceView, level=0.5):
    """(top, bottom, left, right) of the pixels more than ``level`` opaque, bottom/right exclusive."""
    alpha = view.rgba[..., 3].numpy() > level
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


# --------------------------------------------------------------------------- bad input

def _missing(tmp_path):
    return tmp_path / "nope.png"


def _directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    return tmp_path / "folder.png"


def _empty(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path / "empty.png"


def _truncated(fmt, suffix):
    def make(tmp_path):
        image, _ = object_on_background(noise=20)  # noise: the compressed stream is long enough to cut
        image.save(tmp_path / f"full{suffix}", format=fmt)
        data = (tmp_path / f"full{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        return tmp_path / f"cut{suffix}"

    return make


def _text_as_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    return tmp_path / "notes.png"


def _unsupported_format(tmp_path):
    object_on_background()[0].save(tmp_path / "photo.ppm")  # decodable by Pillow, but not a format we accept
    return tmp_path / "photo.ppm"


def _tiny(tmp_path):
    Image.new("RGB", (31, 200), "white").save(tmp_path / "thin.png")
    return tmp_path / "thin.png"


BAD_INPUTS = [
    (_missing, "image not found"),
    (_directory, "is a directory"),
    (_empty, "image file is empty"),
    (_truncated("PNG", ".png"), "truncated or corrupt"),
    (_truncated("JPEG", ".jpg"), "truncated or corrupt"),
    (_text_as_png, "not a PNG, JPEG, WebP, BMP, TIFF or GIF file"),
    (_unsupported_format, "not a PNG, JPEG, WebP, BMP, TIFF or GIF file"),
    (_tiny, r"too small: 31x200 pixels, need at least 32"),
]


@pytest.mark.parametrize("check", [validate_image, load_image])
@pytest.mark.parametrize("make, message", BAD_INPUTS, ids=[m.__name__.strip("_") + str(i) for i, (m, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_one_clear_line(tmp_path, check, make, message):
    path = make(tmp_path)
    with pytest.raises(BadInput, match=message) as caught:
        check(path)
    text = str(caught.value)
    assert str(path) in text and "\n" not in text
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("pixels", [50 * 50, 30 * 30])  # just above the limit (Pillow only warns) and twice over
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, pixels):
    Image.new("RGB", (60, 60), "white").save(tmp_path / "bomb.png")  # 3600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    for check in (validate_image, load_image):
        with pytest.raises(BadInput, match=f"too large to decode safely \\(over {pixels:,} pixels"):
            check(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    assert load_image(tmp_path / "bomb.png").size == (60, 60)


def test_validate_accepts_a_good_image_and_unicode_paths_with_spaces(tmp_path):
    folder = tmp_path / "mes photos é" / "椅子 chair"
    folder.mkdir(parents=True)
    path = folder / "chaise longue ü.png"
    object_on_background()[0].save(path)
    assert validate_image(path) is None
    assert validate_image(str(path)) is None
    image = load_image(str(path))
    assert image.mode == "RGBA" and image.size == (200, 150)


# --------------------------------------------------------------------------- modes and formats

def _grey16(value):
    return Image.fromarray(np.full((40, 48), value, np.uint16))


def _palette_with_transparency():
    image = Image.new("P", (48, 40), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (0, 0, 48, 10))  # index 0 is declared transparent below
    image.info["transparency"] = 0
    return image


# (name, image factory, save format, suffix, expected RGBA at (5, 30), expected RGBA at (5, 2), tolerance)
MODES = [
    ("RGB", lambda: Image.new("RGB", (48, 40), RED), "PNG", ".png", (*RED, 255), (*RED, 255), 0),
    ("RGBA", lambda: _two_band_alpha(Image.new("RGBA", (48, 40), (*RED, 255))), "PNG", ".png", (*RED, 255), (0, 0, 0, 0), 0),
    ("L", lambda: Image.new("L", (48, 40), 128), "PNG", ".png", (128, 128, 128, 255), (128, 128, 128, 255), 0),
    ("LA", lambda: _two_band_alpha(Image.new("LA", (48, 40), (90, 255))), "PNG", ".png", (90, 90, 90, 255), (0, 0, 0, 0), 0),
    ("1", lambda: Image.new("1", (48, 40), 1), "BMP", ".bmp", (255, 255, 255, 255), (255, 255, 255, 255), 0),
    ("P+tRNS png", _palette_with_transparency, "PNG", ".png", (*RED, 255), (0, 0, 0, 0), 0),
    ("P+transparency gif", _palette_with_transparency, "GIF", ".gif", (*RED, 255), (0, 0, 0, 0), 0),
    ("CMYK jpeg", lambda: Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "JPEG", ".jpg", (255, 0, 0, 255), (255, 0, 0, 255), 3),
    ("CMYK tiff", lambda: Image.new("CMYK", (48, 40), (0, 255, 255, 0)), "TIFF", ".tif", (255, 0, 0, 255), (255, 0, 0, 255), 0),
    ("I;16 png", lambda: _grey16(128 * 257), "PNG", ".png", (128, 128, 128, 255), (128, 128, 128, 255), 0),
    ("I;16 tiff", lambda: _grey16(200 * 257), "TIFF", ".tif", (200, 200, 200, 255), (200, 200, 200, 255), 0),
    ("I tiff", lambda: Image.fromarray(np.full((40, 48), 64 * 257, np.int32)), "TIFF", ".tif", (64, 64, 64, 255), (64, 64, 64, 255), 0),
    ("F tiff", lambda: Image.fromarray(np.full((40, 48), 0.5, np.float32)), "TIFF", ".tif", (128, 128, 128, 255), (128, 128, 128, 255), 0),
    ("RGB jpeg", lambda: Image.new("RGB", (48, 40), RED), "JPEG", ".jpeg", (*RED, 255), (*RED, 255), 3),
    ("RGB bmp", lambda: Image.new("RGB", (48, 40), RED), "BMP", ".bmp", (*RED, 255), (*RED, 255), 0),
    ("RGBA webp", lambda: _two_band_alpha(Image.new("RGBA", (48, 40), (*RED, 255))), "WEBP", ".webp", (*RED, 255), (0, 0, 0, 0), 0),
]


def _two_band_alpha(image):
    """Top 10 rows fully transparent (colour cleared), the rest opaque."""
    clear = Image.new(image.mode, (48, 10), (0,) * len(image.getbands()))
    image.paste(clear, (0, 0))
    return image


@pytest.mark.parametrize("name, factory, fmt, suffix, below, above, tolerance", MODES, ids=[m[0] for m in MODES])
def test_every_mode_decodes_to_sensible_rgba(tmp_path, name, factory, fmt, suffix, below, above, tolerance):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"image{suffix}"
    options = {"lossless": True} if fmt == "WEBP" else {}
    factory().save(path, format=fmt, **options)
    image = load_image(path)
    assert image.mode == "RGBA" and image.size == (48, 40)
    got_below, got_above = np.array(image.getpixel((5, 30))), np.array(image.getpixel((5, 2)))
    if above[3] == 0:  # transparent: only the alpha is defined
        assert got_above[3] == 0
    else:
        assert np.abs(got_above - above).max() <= tolerance, got_above
    assert np.abs(got_below - below).max() <= tolerance, got_below


def test_16_bit_colour_png_keeps_its_range(tmp_path):
    import cv2

    values = np.zeros((40, 48, 4), np.uint16)
    values[..., :3] = np.array([30, 60, 240]) * 257  # BGR in OpenCV's order: red 240, green 60, blue 30
    values[..., 3] = 65535
    values[:10, :, 3] = 0
    cv2.imwrite(str(tmp_path / "deep.png"), values)
    image = load_image(tmp_path / "deep.png")
    assert image.getpixel((5, 30)) == (240, 60, 30, 255)
    assert image.getpixel((5, 2))[3] == 0


def test_phone_mpo_jpeg_is_a_jpeg(tmp_path):
    frames = [Image.new("RGB", (48, 40), RED), Image.new("RGB", (48, 40), "blue")]
    frames[0].save(tmp_path / "IMG_0001.JPG", format="MPO", save_all=True, append_images=frames[1:])
    pixel = np.array(load_image(tmp_path / "IMG_0001.JPG").getpixel((10, 10)))
    assert np.abs(pixel - (*RED, 255)).max() <= 3


def test_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (48, 40), colour) for colour in (RED, (20, 200, 40), (20, 40, 200))]
    frames[0].save(tmp_path / "spin.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "spin.gif").n_frames == 3
    pixel = np.array(load_image(tmp_path / "spin.gif").getpixel((10, 10)))
    assert np.abs(pixel - (*RED, 255)).max() <= 8  # GIF's palette quantisation


@pytest.mark.parametrize("orientation, expected_size, red_corner", [(1, (60, 40), (0, 0)), (3, (60, 40), (59, 39)), (6, (40, 60), (39, 0)), (8, (40, 60), (0, 59))])
def test_exif_orientation_is_applied(tmp_path, orientation, expected_size, red_corner):
    # stored 60 wide, 40 high, red block at the stored top-left corner
    pixels = np.full((40, 60, 3), 255, np.uint8)
    pixels[:16, :16] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == expected_size
    # orientation 6 is "turn 90 degrees clockwise to view": the stored top-left lands top-right; 8 the reverse
    x, y = red_corner
    assert np.abs(np.array(image.getpixel((x, y))[:3]) - RED).max() < 30
    assert np.array(image.getpixel((expected_size[0] - 1 - x, expected_size[1] - 1 - y))[:3]).min() > 220


# --------------------------------------------------------------------------- foreground

def test_alpha_is_the_mask_when_it_is_a_cutout():
    image, truth = cutout()
    mask, source = foreground_mask(image)
    assert source == "alpha" and mask.dtype == bool
    np.testing.assert_array_equal(mask, truth)


def test_mask_path_is_used_and_validated(tmp_path):
    image, truth = object_on_background()
    Image.fromarray(truth.astype(np.uint8) * 255, "L").save(tmp_path / "my mask é.png")
    mask, source = foreground_mask(image, tmp_path / "my mask é.png")
    assert source == "mask"
    np.testing.assert_array_equal(mask, truth)

    # an RGBA mask is read from its alpha channel, and it wins over the image's own alpha
    shifted = np.roll(truth, 7, axis=1)
    rgba_mask = np.zeros((*truth.shape, 4), np.uint8)
    rgba_mask[..., 3] = shifted * 255
    Image.fromarray(rgba_mask, "RGBA").save(tmp_path / "alpha mask.png")
    mask, source = foreground_mask(cutout()[0], str(tmp_path / "alpha mask.png"))
    assert source == "mask"
    np.testing.assert_array_equal(mask, shifted)


def test_bad_mask_path_is_bad_input(tmp_path):
    image, truth = object_on_background()
    Image.new("L", (100, 75), 255).save(tmp_path / "small.png")
    with pytest.raises(BadInput, match=r"mask .*small.png is 100x75 but the image is 200x150"):
        foreground_mask(image, tmp_path / "small.png")
    with pytest.raises(BadInput, match="mask not found"):
        foreground_mask(image, tmp_path / "absent.png")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInput, match="cannot read mask"):
        foreground_mask(image, tmp_path / "garbage.png")


def test_grabcut_fallback_cuts_out_an_object_on_a_plain_background(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "no rembg models"))
    image, truth = object_on_background(size=(240, 180), box=(70, 50, 170, 140), noise=4)
    with caplog.at_level(logging.WARNING, logger="recon.prepare"):
        mask, source = foreground_mask(image)
    assert source == "grabcut"
    assert any("GrabCut" in record.getMessage() for record in caplog.records)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95, iou


def test_grabcut_works_on_large_images_through_a_downscaled_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "no rembg models"))
    image, truth = object_on_background(size=(1200, 900), box=(350, 250, 850, 700), noise=4)
    mask, source = foreground_mask(image)
    assert source == "grabcut" and mask.shape == truth.shape
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_opaque_alpha_is_not_a_cutout(monkeypatch, tmp_path):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "no rembg models"))
    image, truth = object_on_background(noise=4)
    _, source = foreground_mask(image.convert("RGBA"))
    assert source == "grabcut"


def _fake_rembg(calls):
    def new_session(name, **kwargs):
        calls.append((name, kwargs))
        return "session"

    def remove(image, session=None, only_mask=False):
        assert session == "session" and only_mask
        mask = np.zeros((image.height, image.width), np.uint8)
        mask[10:60, 20:90] = 255
        return Image.fromarray(mask, "L")

    return types.SimpleNamespace(new_session=new_session, remove=remove)


def test_rembg_is_used_only_when_its_model_is_already_on_disk(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg(calls))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net home"))
    image, _ = object_on_background(noise=4)

    _, source = foreground_mask(image)
    assert source == "grabcut" and calls == []  # no model file: rembg is never asked (it would download)

    model = tmp_path / "u2net home" / "u2net.onnx"
    model.parent.mkdir()
    model.write_bytes(b"onnx")
    mask, source = foreground_mask(image)
    assert source == "rembg"
    assert calls == [("u2net_custom", {"model_path": str(model)})]  # the session that reads our file, not a download
    assert mask[10:60, 20:90].all() and mask.sum() == 50 * 70


# --------------------------------------------------------------------------- recentring

@pytest.mark.parametrize(
    "size, box",
    [
        ((200, 150), (60, 40, 140, 120)),  # square object
        ((300, 200), (40, 50, 100, 170)),  # tall object, off centre
        ((400, 300), (0, 230, 130, 300)),  # wide object touching two edges of the photo
        ((640, 480), (300, 200, 330, 215)),  # small object: scaled up
    ],
)
def test_recentring_geometry(size, box):
    image, truth = cutout(size, box)
    view = prepare_reference(image, truth, border_ratio=0.2, size=256)
    assert view.rgba.shape == (256, 256, 4) and view.rgba.dtype == torch.float32
    top, bottom, left, right = alpha_box(view)
    longest = max(bottom - top, right - left)
    assert abs(longest - 0.8 * 256) <= 1.5
    assert abs((top + bottom) / 2 - 128) <= 1 and abs((left + right) / 2 - 128) <= 1
    # the aspect ratio survives
    width, height = box[2] - box[0], box[3] - box[1]
    assert abs((right - left) / (bottom - top) - width / height) < 0.03


def test_border_ratio_and_size_are_honoured():
    image, truth = cutout()
    view = prepare_reference(image, truth, border_ratio=0.5, size=128)
    top, bottom, left, right = alpha_box(view)
    assert view.rgba.shape[0] == 128 and abs((bottom - top) - 64) <= 1.5


def test_resize_is_alpha_aware_and_keeps_colour():
    image, truth = cutout(size=(640, 480), box=(200, 150, 440, 330))
    view = prepare_reference(image, truth)
    rgba = view.rgba.numpy()
    solid = rgba[..., 3] > 0.99
    edge = (rgba[..., 3] > 0.05) & ~solid
    assert edge.any()
    # straight alpha: edge pixels keep the object's colour instead of fading to the (black) transparent surround
    assert rgba[edge][:, 0].mean() > 0.7 * rgba[solid][:, 0].mean()
    assert (rgba[..., 3] == 0).mean() > 0.3  # the surround is transparent


def test_soft_alpha_inside_the_mask_is_kept():
    image, truth = cutout()
    pixels = np.array(image)
    pixels[60:100, 80:120, 3] = 100  # a semi-transparent window in the object
    image = Image.fromarray(pixels, "RGBA")
    view = prepare_reference(image, truth)
    assert abs(view.rgba[128, 128, 3].item() - 100 / 255) < 0.02


@pytest.mark.parametrize("fill, message", [(0.0, "foreground mask is empty"), (1.0, "fills 100% of the image")])
def test_empty_or_full_foreground_is_bad_input(fill, message):
    image, _ = object_on_background()
    mask = np.full((150, 200), bool(fill))
    with pytest.raises(BadInput, match=message):
        prepare_reference(image, mask)


def test_save_reference_writes_rgba_png(tmp_path):
    image, truth = cutout()
    view = prepare_reference(image, truth)
    path = tmp_path / "run dir" / "input.png"
    save_reference(view, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["input.png"]  # no temporary left behind
    with Image.open(path) as saved:
        assert saved.mode == "RGBA" and saved.size == (256, 256)
        values = np.asarray(saved, dtype=np.float32) / 255
    assert np.abs(values - view.rgba.numpy()).max() <= 0.5 / 255 + 1e-6


def test_end_to_end_from_a_file(tmp_path):
    """What the pipeline does: load, validate, mask, prepare, save."""
    image, _ = cutout(size=(300, 240), box=(100, 30, 180, 200))
    path = tmp_path / "object with alpha.png"
    image.save(path)
    validate_image(path)
    loaded = load_image(path)
    mask, source = foreground_mask(loaded)
    view = prepare_reference(loaded, mask, size=64)
    save_reference(view, tmp_path / "input.png")
    assert source == "alpha" and view.rgba.shape == (64, 64, 4)
    colour, alpha = view.at(64)
    assert colour.shape == (64, 64, 3) and float(alpha.max()) == 1.0
