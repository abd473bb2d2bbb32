"""Pictures of the finished asset: a turntable video and a contact sheet.

* ``preview.mp4``: the textured mesh spinning once at a fixed elevation, H.264
  in yuv420p (the pixel format browsers and phones decode) with the index at
  the front of the file (``+faststart``) so it starts playing while loading.
  Where no video encoder is available (imageio-ffmpeg missing or its ffmpeg
  unable to write H.264) it is ``preview.gif`` instead.
* ``preview.png``: a 2 x 4 contact sheet, four sides at the turntable's
  elevation and four diagonals seen from above, each tile half the turntable's
  resolution and rendered with 2x supersampling.

The mesh is rendered as the asset will look (``shading="albedo"``: the baked
colours, unlit); cameras follow recon's orbit convention (azimuth 0 is the
input view). Every file is renamed into place only when complete.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from recon.camera import Cameras, orbit_cameras
from recon.io_utils import atomic_path
from recon.mesh.data import MeshData
from recon.render.mesh_raster import render_mesh

log = logging.getLogger(__name__)

DEFAULT_FOVY = 40.0  # the fit's field of view (CameraConfig.fovy)
FRAME_MARGIN = 1.1  # the bounding sphere fills 1/1.1 of the narrower half-field of view
SHEET_COLUMNS = 4
SHEET_TOP_ELEVATION = 45.0  # the contact sheet's second row looks down on the object
RENDER_BATCH = 8  # views per render call: bounds memory at large resolutions


@dataclass
class Previews:
    """The pictures of a finished asset, in memory: checked (the web app's safety checker) before any is written."""

    turntable: np.ndarray  # uint8 [N, H, W, 3], one frame per step round the object
    sheet: np.ndarray  # uint8 [2 h, 4 w, 3], the contact sheet

    def images(self) -> List[np.ndarray]:
        """Every picture a viewer would see: the turntable's frames, then the sheet."""
        return list(self.turntable) + [self.sheet]


def render_previews(
    mesh: MeshData,
    frames: int = 60,
    resolution: int = 512,
    elevation: float = 15.0,
    distance: Optional[float] = None,
    fovy: Optional[float] = None,
    background=(1.0, 1.0, 1.0),
) -> Previews:
    """The turntable (``frames`` views at ``elevation``) and the contact sheet of ``mesh``.

    ``distance=None`` frames the whole mesh from any direction (its bounding
    sphere about the origin, where cameras look, fits the view with a margin).
    """
    fovy = DEFAULT_FOVY if fovy is None else fovy
    distance = framing_distance(mesh, fovy) if distance is None else distance
    device = mesh.device
    turntable = orbit_cameras(frames, elevation, distance, fovy, device=device)
    video = _render(mesh, turntable, resolution, background, ssaa=1)
    tile = max(resolution // 2, 16)
    azimuths = torch.arange(SHEET_COLUMNS, dtype=torch.float32) * (360.0 / SHEET_COLUMNS)
    sheet_cameras = Cameras.make(
        torch.cat([torch.full((SHEET_COLUMNS,), float(elevation)), torch.full((SHEET_COLUMNS,), SHEET_TOP_ELEVATION)]),
        torch.cat([azimuths, azimuths + 180.0 / SHEET_COLUMNS]),
        distance,
        fovy,
        device=device,
    )
    tiles = _render(mesh, sheet_cameras, tile, background, ssaa=2)
    return Previews(video, contact_sheet(tiles, SHEET_COLUMNS))


def save_previews(previews: Previews, run_dir: Path, fps: int = 20) -> Dict[str, Path]:
    """Write ``preview.mp4`` (or ``preview.gif``) and ``preview.png`` into ``run_dir``; the paths keyed ``mp4`` or ``gif``, and ``png``."""
    run_dir = Path(run_dir)
    written = _write_video(previews.turntable, run_dir / "preview", fps)
    written["png"] = run_dir / "preview.png"
    _save_image(previews.sheet, written["png"], "PNG")
    return written


def write_previews(mesh: MeshData, run_dir: Path, frames: int = 60, resolution: int = 512, fps: int = 20, **view) -> Dict[str, Path]:
    """Render and write the previews of ``mesh`` (:func:`render_previews`'s ``view`` arguments)."""
    return save_previews(render_previews(mesh, frames, resolution, **view), run_dir, fps)


def framing_distance(mesh: MeshData, fovy: float) -> float:
    """Camera distance at which the mesh's bounding sphere about the origin fits the view."""
    radius = float(mesh.vertices.norm(dim=-1).max()) if len(mesh.vertices) else 1.0
    return FRAME_MARGIN * max(radius, 1e-6) / math.sin(math.radians(fovy) / 2.0)


def contact_sheet(tiles: np.ndarray, columns: int) -> np.ndarray:
    """[N, h, w, 3] tiles -> one [rows * h, columns * w, 3] image, row-major (N a multiple of ``columns``)."""
    n, h, w, c = tiles.shape
    rows = n // columns
    return tiles.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def _render(mesh: MeshData, cameras: Cameras, resolution: int, background, ssaa: int) -> np.ndarray:
    """uint8 frames [N, H, W, 3], rendered a batch of views at a time."""
    batches = []
    for start in range(0, len(cameras), RENDER_BATCH):
        views = cameras[start : start + RENDER_BATCH]
        rgb = render_mesh(mesh, views, resolution, background=tuple(background), shading="albedo", ssaa=ssaa)["rgb"]
        batches.append((rgb.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(batches)


def video_encoder_available() -> bool:
    """Whether imageio-ffmpeg and its ffmpeg binary are there (bundled with the wheel, or on PATH)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # ImportError, or RuntimeError when no binary is found
        return False
    return True


def _write_video(frames: np.ndarray, stem: Path, fps: int) -> Dict[str, Path]:
    if video_encoder_available():
        path = stem.with_suffix(".mp4")
        try:
            _write_mp4(frames, path, fps)
            return {"mp4": path}
        except Exception as error:  # e.g. an ffmpeg build without libx264
            log.warning("preview: could not encode %s (%s); writing a GIF instead", path.name, error)
    path = stem.with_suffix(".gif")
    _write_gif(frames, path, fps)
    return {"gif": path}


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    import imageio.v2 as imageio

    with atomic_path(path) as temporary:
        writer = imageio.get_writer(
            temporary,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=8,
            macro_block_size=16,  # H.264 in yuv420p wants even sizes; 16 avoids a resize warning too
            output_params=["-movflags", "+faststart"],
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    images: List[Image.Image] = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as temporary:
        images[0].save(
            temporary,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / fps),
            loop=0,  # loop forever, like a turntable
            disposal=1,
        )


def _save_image(image: np.ndarray, path: Path, format: str) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format=format)
