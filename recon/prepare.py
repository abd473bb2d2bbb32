"""Image in: decode, validate, cut out the object, recentre, resize.

Produces the :class:`ReferenceView` that the fit and the prior condition on:

    validate_image(path)                      # cheap check before any model loads
    image = load_image(path)                  # RGBA, upright
    mask, source = foreground_mask(image, mask_path)
    view = prepare_reference(image, mask, border_ratio, size)
    save_reference(view, run_dir / "input.png")

Every problem with the user's files is a one-line :class:`~recon.errors.BadInput`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from recon.errors import BadInput, one_line
from recon.frames import Recentring
from recon.io_utils import atomic_path


@dataclass
class ReferenceView:
    """The input view as straight-alpha RGBA, square, object centred."""

    rgba: torch.Tensor  # [S, S, 4] float32 in [0, 1]
    # How the photo's pixels were moved to make it (None when it was not cut from a photo).
    recentring: Optional[Recentring] = None

    def at(self, resolution: int, background=(1.0, 1.0, 1.0)):
        """(rgb over ``background`` [r, r, 3], alpha [r, r, 1]) resized with area averaging."""
        rgba = self.rgba
        if rgba.shape[0] != resolution:
            # average premultiplied colour so that edges do not bleed the background in
            premultiplied = torch.cat([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], dim=-1)
            resized = F.interpolate(premultiplied.permute(2, 0, 1)[None], size=(resolution, resolution), mode="area")[0].permute(1, 2, 0)
            alpha = resized[..., 3:]
            colour = resized[..., :3]
        else:
            alpha = rgba[..., 3:]
            colour = rgba[..., :3] * alpha
        bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
        return colour + (1.0 - alpha) * bg, alpha


# --------------------------------------------------------------------------- decoding

# Formats we accept. Pillow can open many more; limiting it keeps rarely used
# (and rarely audited) decoders away from user files. Phone JPEGs that are
# really MPO files still open: Pillow's JPEG opener hands them on.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
SUPPORTED_NAMES = "PNG, JPEG, WebP, BMP, TIFF or GIF"
MIN_SIDE = 32  # smaller images carry too little of the object to reconstruct
MAX_ASPECT = 8  # longer strips leave the object a few pixels wide once squared up
MIN_FOREGROUND_PIXELS = 64
MAX_FOREGROUND_FRACTION = 0.95  # above this there is no background to separate the object from
TRANSPARENT_FRACTION = 0.01  # share of clear pixels for an alpha channel to count as a cut-out
REMBG_MODEL = "u2net.onnx"

log = logging.getLogger(__name__)


def validate_image(path) -> None:
    """Raise :class:`BadInput` unless ``path`` decodes to a usable image (run before any model loads)."""
    _decode(path)


def load_image(path) -> Image.Image:
    """Decode ``path`` (first frame, EXIF orientation applied) to an 8-bit RGBA image."""
    return _to_rgba(_decode(path))


def _decode(path, what: str = "image") -> Image.Image:
    """Open, check and fully decode one file; every failure is a one-line :class:`BadInput`."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{what} not found: {path}")
    if path.is_dir():
        raise BadInput(f"{what} path is a directory, expected a file: {path}")
    if path.stat().st_size == 0:
        raise BadInput(f"{what} file is empty: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; treat both as refusals
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
                if min(width, height) < MIN_SIDE:
                    raise BadInput(f"{what} is too small: {width}x{height} pixels, need at least {MIN_SIDE} on each side: {path}")
                if max(width, height) > MAX_ASPECT * min(width, height):
                    raise BadInput(f"{what} is {width}x{height} pixels, too long and thin (at most {MAX_ASPECT}:1): {path}")
                image.load()  # decode now: truncated files only fail here
                return _apply_orientation(image)
    except BadInput:
        raise
    except UnidentifiedImageError:
        raise BadInput(f"cannot read {what} {path}: not a {SUPPORTED_NAMES} file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(
            f"{what} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} pixels, "
            f"a possible decompression bomb): {path}"
        ) from None
    except PermissionError as error:
        raise BadInput(f"cannot read {what} {path}: {error.strerror.lower()}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadInput(f"cannot decode {what} {path}: truncated or corrupt ({one_line(error)})") from None


def _apply_orientation(image: Image.Image) -> Image.Image:
    """A copy of the decoded image turned upright as its EXIF orientation says."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # a broken EXIF block should not cost the user the image
        log.warning("ignoring unreadable EXIF orientation (%s)", one_line(error))
        return image.copy()


def _to_rgba(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow clips these to 0..255 when converting; rescale from their
        # nominal range instead (16-bit integers, floats in [0, 1])
        values = np.asarray(image, dtype=np.float64)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        grey = np.clip(np.round(values / full_scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGBA")
    try:
        return image.convert("RGBA")  # applies palette transparency, CMYK inversion, etc.
    except ValueError:  # modes without a direct conversion (LAB, HSV, ...)
        return image.convert("RGB").convert("RGBA")


# --------------------------------------------------------------------------- foreground

def foreground_mask(image: Image.Image, mask_path=None) -> Tuple[np.ndarray, str]:
    """The object's pixels (bool [H, W]) and where they came from.

    Sources, first that applies: ``mask_path`` (an explicit ``--mask`` wins over
    everything); the image's alpha, when it is a real cut-out (some pixels
    transparent); rembg, when installed and its model file is already on disk
    (never downloaded from here); GrabCut seeded from the image border.
    """
    rgba = _to_rgba(image)
    alpha = np.asarray(rgba.getchannel("A"))
    if mask_path is not None:
        if _is_cutout(alpha):
            log.info("--mask given: using it instead of the image's own alpha channel")
        return _load_mask(mask_path, rgba.size), "mask"
    if _is_cutout(alpha):
        return alpha >= 128, "alpha"
    mask = _rembg_mask(rgba)
    if mask is not None:
        return mask, "rembg"
    log.warning(
        "no alpha channel, --mask or local rembg model: cutting the object out with GrabCut, "
        "which can be rough on busy backgrounds; pass --mask or an RGBA image for a clean cut-out"
    )
    return _grabcut_mask(rgba), "grabcut"


def _is_cutout(alpha: np.ndarray) -> bool:
    return float((alpha < 128).mean()) >= TRANSPARENT_FRACTION


def _load_mask(path, size) -> np.ndarray:
    mask = _to_rgba(_decode(path, what="mask"))
    if mask.size != size:
        raise BadInput(f"mask {path} is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; they must match")
    alpha = np.asarray(mask.getchannel("A"))
    if _is_cutout(alpha):
        return alpha >= 128
    return np.asarray(mask.convert("L")) >= 128  # white = object


def _rembg_model_path() -> Path:
    # where rembg keeps its models (same environment variables it reads)
    home = os.environ.get("U2NET_HOME") or os.path.join(os.environ.get("XDG_DATA_HOME", "~"), ".u2net")
    return Path(home).expanduser() / REMBG_MODEL


def _rembg_mask(rgba: Image.Image) -> Optional[np.ndarray]:
    model = _rembg_model_path()
    try:
        import rembg
    except (ImportError, SystemExit):  # some rembg versions exit when onnxruntime is missing
        return None
    if not model.is_file():
        log.info("rembg is installed but %s is missing; not downloading it", model)
        return None
    try:
        # the "custom" session reads the file we point at; the named ones may fetch weights
        session = rembg.new_session("u2net_custom", model_path=str(model))
        cut = rembg.remove(rgba.convert("RGB"), session=session, only_mask=True)
    except Exception as error:
        log.warning("rembg failed (%s); falling back to GrabCut", one_line(error))
        return None
    return np.asarray(cut.convert("L").resize(rgba.size, Image.Resampling.BILINEAR)) >= 128


def _grabcut_mask(rgba: Image.Image, work_side: int = 512, iterations: int = 5) -> np.ndarray:
    """Classical cut-out: the border is background, the rest is probably object."""
    rgb = np.asarray(rgba.convert("RGB"))
    height, width = rgb.shape[:2]
    scale = min(1.0, work_side / max(height, width))  # GrabCut is slow on big images; the mask need not be sharp
    small = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    band = max(2, round(0.02 * max(small.shape[:2])))
    seeds = np.full(small.shape[:2], cv2.GC_PR_FGD, np.uint8)
    seeds[:band], seeds[-band:], seeds[:, :band], seeds[:, -band:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means initialisation draws from OpenCV's global RNG
    try:
        cv2.grabCut(
            np.ascontiguousarray(small[..., ::-1]), seeds, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK
        )
    except cv2.error as error:
        raise BadInput(f"could not separate the object from the background ({one_line(error)}); pass --mask") from None
    foreground = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.uint8)

    # drop specks of mislabelled background: keep regions of at least 5% of the largest one
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count > 1:
        areas = stats[1:, cv2.CC_STAT_AREA]
        keep = np.concatenate([[False], areas >= 0.05 * areas.max()])
        foreground = keep[labels].astype(np.uint8)

    if scale < 1:
        foreground = cv2.resize(foreground * 255, (width, height), interpolation=cv2.INTER_LINEAR) >= 128
    return foreground.astype(bool)


# --------------------------------------------------------------------------- reference view

def prepare_reference(image: Image.Image, mask: np.ndarray, border_ratio: float = 0.2, size: int = 256) -> ReferenceView:
    """Cut the object out, centre it in a square and resize: its longest side becomes ``(1 - border_ratio) * size``.

    The view's ``recentring`` is the 2-D similarity this applied to the photo's pixel coordinates.
    """
    if not 0.0 <= border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")
    rgba = _to_rgba(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (rgba.height, rgba.width):
        raise ValueError(f"mask shape {mask.shape} does not match the image ({rgba.height}, {rgba.width})")

    count = int(mask.sum())
    if count < MIN_FOREGROUND_PIXELS:
        raise BadInput(f"no object found: the foreground mask is empty ({count} pixels); pass --mask or an RGBA cut-out")
    if count / mask.size > MAX_FOREGROUND_FRACTION:
        raise BadInput(
            f"the foreground fills {100 * count / mask.size:.0f}% of the image, leaving no background to separate "
            "the object from; pass --mask or an RGBA cut-out with a transparent background"
        )

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(bottom - top, right - left) / (1.0 - border_ratio)
    centre_x, centre_y = (left + right) / 2.0, (top + bottom) / 2.0
    box = (centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2)

    # keep the image's own soft alpha inside the mask, nothing outside it
    alpha = np.asarray(rgba.getchannel("A")) * mask
    cutout = rgba.copy()
    cutout.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))

    # crop to whole pixels around the square (Pillow pads outside the image with
    # transparent black), then resample the exact square; Pillow resizes RGBA on
    # premultiplied colour, so the transparent surround does not darken the edges
    origin_x, origin_y = math.floor(box[0]), math.floor(box[1])
    region = cutout.crop((origin_x, origin_y, math.ceil(box[2]), math.ceil(box[3])))
    square = region.resize(
        (size, size),
        Image.Resampling.LANCZOS,
        box=(box[0] - origin_x, box[1] - origin_y, box[2] - origin_x, box[3] - origin_y),
        reducing_gap=3.0,
    )
    values = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)
    scale = size / side
    return ReferenceView(rgba=values, recentring=Recentring(scale, -box[0] * scale, -box[1] * scale, size))


def save_reference(view: ReferenceView, path) -> None:
    """Write the reference view as an 8-bit RGBA PNG (the run's ``input.png``), atomically."""
    values = (view.rgba.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    with atomic_path(path) as temporary:
        Image.fromarray(values, "RGBA").save(temporary, format="PNG")
