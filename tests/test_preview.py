import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import recon.mesh.preview as preview
from recon.mesh.data import MeshData
from recon.mesh.preview import contact_sheet, framing_distance, write_previews

FRAMES, RESOLUTION = 8, 64


@pytest.fixture
def mesh():
    """A red ball sitting off-centre on a blue pillar: the turntable frames must differ."""
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.25)
    ball.apply_translation((0.2, 0.0, 0.3))
    pillar = trimesh.creation.box(extents=(0.2, 0.2, 0.6))
    both = trimesh.util.concatenate([ball, pillar])
    colors = torch.zeros(len(both.vertices), 3)
    colors[: len(ball.vertices), 0] = 1.0
    colors[len(ball.vertices) :, 2] = 1.0
    return MeshData(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces, dtype=torch.int64), vertex_colors=colors)


def _foreground(image):
    """Pixels that are not the white background."""
    return (np.asarray(image)[..., :3] < 250).any(axis=-1)


def test_video_and_contact_sheet(tmp_path, mesh):
    written = write_previews(mesh, tmp_path, frames=FRAMES, resolution=RESOLUTION)
    assert set(written) == {"mp4", "png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.mp4", "preview.png"]  # no temporaries

    video = iio.imread(written["mp4"])
    assert video.shape == (FRAMES, RESOLUTION, RESOLUTION, 3)
    meta = iio.immeta(written["mp4"], plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["fps"] == pytest.approx(20)
    assert meta["pix_fmt"].startswith("yuv420p")  # what browsers decode
    # The object is in every frame and the turntable turns.
    assert all(_foreground(frame).mean() > 0.02 for frame in video)
    assert np.abs(video[0].astype(int) - video[FRAMES // 4].astype(int)).mean() > 2

    sheet = np.asarray(Image.open(written["png"]))
    tile = RESOLUTION // 2
    assert sheet.shape == (2 * tile, 4 * tile, 3)
    tiles = sheet.reshape(2, tile, 4, tile, 3).transpose(0, 2, 1, 3, 4).reshape(8, tile, tile, 3)
    for view in tiles:
        covered = _foreground(view)
        assert covered.mean() > 0.02
        # Framed: nothing touches the border.
        assert not covered[0].any() and not covered[-1].any() and not covered[:, 0].any() and not covered[:, -1].any()


def test_gif_fallback_without_ffmpeg(tmp_path, mesh, monkeypatch):
    import imageio_ffmpeg

    def no_ffmpeg():
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_ffmpeg)
    written = write_previews(mesh, tmp_path, frames=FRAMES, resolution=RESOLUTION)
    assert set(written) == {"gif", "png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.gif", "preview.png"]
    gif = Image.open(written["gif"])
    assert gif.n_frames == FRAMES and gif.size == (RESOLUTION, RESOLUTION)
    assert gif.info.get("loop") == 0


def test_gif_fallback_when_encoding_fails(tmp_path, mesh, monkeypatch):
    """An ffmpeg that cannot encode H.264: no partial mp4 is left, a GIF takes its place."""

    def broken_writer(frames, path, fps):
        with preview.atomic_path(path) as temporary:
            temporary.write_bytes(b"\x00" * 100)
            raise OSError("Unknown encoder 'libx264'")

    monkeypatch.setattr(preview, "_write_mp4", broken_writer)
    written = write_previews(mesh, tmp_path, frames=4, resolution=32)
    assert set(written) == {"gif", "png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.gif", "preview.png"]


def test_framing_distance_fits_the_bounding_sphere():
    vertices = torch.tensor([[0.0, 0.0, 0.5], [0.3, 0.0, 0.0], [0.0, -0.2, 0.0]])
    mesh = MeshData(vertices, torch.tensor([[0, 1, 2]]))
    distance = framing_distance(mesh, fovy=40.0)
    # The sphere of radius 0.5 subtends less than the half field of view of 20 degrees.
    assert np.degrees(np.arcsin(0.5 / distance)) < 20.0
    assert distance < 2.0  # and the object is not lost in the distance


def test_contact_sheet_layout():
    tiles = np.arange(8)[:, None, None, None] * np.ones((8, 2, 3, 1), dtype=int)
    sheet = contact_sheet(tiles, columns=4)
    assert sheet.shape == (4, 12, 1)
    np.testing.assert_array_equal(sheet[::2, ::3, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])
