"""The frames a reconstruction passes through, and the one map between them (docs/design.md, "Frames").

* **Photo world**: where the photographed object lives. The photo was taken by
  a :class:`PhotoCamera` at (elevation, azimuth 0, distance) looking at this
  world's origin, +z up (recon's camera convention). In the benchmark and the
  self-check this is the truth's frame (the unit cube); for a user's photo it
  is the camera the run assumes (``--elevation`` and the preset's distance and
  field of view).
* **Prepared view**: ``prepare`` cuts the object out of the photo and recentres
  it, a 2-D similarity of pixel coordinates (:class:`Recentring`).
* **Fit frame**: the field's box. The fit's reference camera sits at
  (elevation, 0, ``camera.distance``) and sees the prepared view.

:func:`fit_to_photo_world` is the similarity that puts the fit frame into the
photo world: the fit's reference camera becomes a virtual camera that looks
from the photo camera's direction through the centre of the crop, and the
scale makes an object at the photo's depth as large in the prepared view as
it is in the fit's reference render. Cropping is not exactly a change of camera
(the focal lengths differ unless the preset's camera matches the photo's), so
the map is a weak-perspective approximation; docs/design.md gives the
measured reprojection error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Recentring:
    """``prepared = scale * original + offset`` for pixel coordinates (x right, y down, pixel centres at +0.5)."""

    scale: float
    offset_x: float
    offset_y: float
    size: int  # the prepared view is size x size pixels

    def apply(self, xy: torch.Tensor) -> torch.Tensor:
        """Original pixel coordinates [..., 2] -> prepared ones."""
        return xy * self.scale + torch.tensor([self.offset_x, self.offset_y], dtype=xy.dtype, device=xy.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhotoCamera:
    """The camera that took a photo: at (elevation, azimuth 0, distance) looking at the origin, +z up."""

    elevation: float  # degrees
    distance: float
    fovy: float  # degrees, over the photo's height
    width: int  # pixels
    height: int

    @property
    def focal(self) -> float:
        """Focal length in pixels."""
        return 0.5 * self.height / math.tan(0.5 * math.radians(self.fovy))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Similarity:
    """``y = scale * rotation @ x + translation``: a rotation, a uniform scale and a shift (float64)."""

    scale: float
    rotation: torch.Tensor  # [3, 3], orthonormal, det +1
    translation: torch.Tensor  # [3]

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Points [..., 3] -> mapped points [..., 3] (in the input's dtype)."""
        rotation, translation = self.rotation.to(points.device), self.translation.to(points.device)
        return (self.scale * points.double() @ rotation.T + translation).to(points.dtype)

    def apply_to_rays(self, origins: torch.Tensor, directions: torch.Tensor):
        """Rays (origins, unit directions) [..., 3] -> the same rays in the other frame (directions stay unit)."""
        return self.apply(origins), (directions.double() @ self.rotation.to(directions.device).T).to(directions.dtype)

    def inverse(self) -> "Similarity":
        rotation = self.rotation.T
        return Similarity(1.0 / self.scale, rotation, -(rotation @ self.translation) / self.scale)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "rotation": self.rotation.tolist(), "translation": self.translation.tolist()}

    @staticmethod
    def from_dict(values: dict) -> "Similarity":
        return Similarity(float(values["scale"]), torch.tensor(values["rotation"], dtype=torch.float64), torch.tensor(values["translation"], dtype=torch.float64))

    @staticmethod
    def identity() -> "Similarity":
        return Similarity(1.0, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))


def camera_basis(forward: torch.Tensor) -> torch.Tensor:
    """Camera-to-world rotation [3, 3] (columns right, up, back: OpenGL's camera axes) looking along ``forward`` [3], +z up.

    The same construction as :func:`recon.camera.look_at` for a camera looking at the origin.
    """
    forward = torch.nn.functional.normalize(forward.double(), dim=0)
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    if right.norm() < 1e-9:  # straight up or down: world +y is "up" in the image, as in look_at
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = torch.nn.functional.normalize(right, dim=0)
    up = torch.linalg.cross(right, forward)
    return torch.stack([right, up, -forward], dim=1)


def orbit_position(elevation: float, azimuth: float, distance: float) -> torch.Tensor:
    """World position [3] (float64) of an orbit camera, as recon.camera.camera_position."""
    e, a = math.radians(elevation), math.radians(azimuth)
    return distance * torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)], dtype=torch.float64)


def fit_to_photo_world(recentring: Recentring, photo: PhotoCamera, fit_distance: float, fit_fovy: float) -> Similarity:
    """The similarity from the fit frame to the photo's world.

    The fit's reference camera is at (photo.elevation, 0, ``fit_distance``)
    with field of view ``fit_fovy`` over the prepared view. With ``c`` the crop
    centre in the photo and ``r`` the unit ray through it from the photo
    camera ``C``:

    * the fit origin goes to ``P = C + photo.distance * r``, the point the crop
      is centred on, at the depth of the photo world's origin;
    * the fit camera's axes go to those of a camera at ``C`` looking along ``r``;
    * one fit unit is ``(f_fit / fit_distance) / (scale * f_photo / photo.distance)``
      photo-world units: the magnification of the fit's reference camera at its
      origin over the prepared view's magnification at ``P``.
    """
    photo_position = orbit_position(photo.elevation, 0.0, photo.distance)
    photo_axes = camera_basis(-photo_position)
    # the crop's centre, in the photo's pixels, and the ray through it
    centre_x = (0.5 * recentring.size - recentring.offset_x) / recentring.scale
    centre_y = (0.5 * recentring.size - recentring.offset_y) / recentring.scale
    local = torch.tensor([(centre_x - 0.5 * photo.width) / photo.focal, -(centre_y - 0.5 * photo.height) / photo.focal, -1.0], dtype=torch.float64)
    ray = torch.nn.functional.normalize(photo_axes @ local, dim=0)
    target = photo_position + photo.distance * ray

    fit_focal = 0.5 * recentring.size / math.tan(0.5 * math.radians(fit_fovy))
    scale = (fit_focal / fit_distance) / (recentring.scale * photo.focal / photo.distance)
    fit_axes = camera_basis(-orbit_position(photo.elevation, 0.0, fit_distance))
    rotation = camera_basis(ray) @ fit_axes.T
    return Similarity(scale, rotation, target)
