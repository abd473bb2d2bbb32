"""Mesh files in and out of recon's frame: one axis convention, both ways.

recon's world is +z up with the input view looking from +x. The files recon
writes (GLB, OBJ; :mod:`recon.mesh.export`) are +y up with the photographed
side facing +z, the convention of glTF and of Blender's OBJ importer. The
rotation between the two is ``(x, y, z) -> (y, z, x)`` (:data:`Z_UP_TO_Y_UP`),
and :func:`load_mesh` applies its exact inverse to every glTF file and to
recon's own OBJ files (marked by their first line), so an exported asset loads
back unrotated. Other OBJ, PLY and STL files are taken as +z up, as Google
Scanned Objects ship.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from recon.errors import BadInput
from recon.mesh.data import MeshData

# z-up, input view from +x (recon) -> y-up, front towards +z (glTF): a cyclic axis permutation.
Z_UP_TO_Y_UP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
OBJ_MARKER = "# recon: +y up"  # the first line of every OBJ recon writes
Y_UP_FORMATS = (".glb", ".gltf")


def to_y_up(points: np.ndarray) -> np.ndarray:
    """recon's frame -> the files' frame, points [N, 3]."""
    return points @ Z_UP_TO_Y_UP.T


def from_y_up(points: np.ndarray) -> np.ndarray:
    """The files' frame -> recon's frame, points [N, 3] (the inverse of :func:`to_y_up`)."""
    return points @ Z_UP_TO_Y_UP


def is_y_up(path: Path) -> bool:
    """Whether a mesh file is in the files' +y-up frame: glTF always, OBJ when recon wrote it."""
    suffix = path.suffix.lower()
    if suffix in Y_UP_FORMATS:
        return True
    if suffix == ".obj":
        with open(path, "rb") as handle:
            return handle.readline().decode("utf-8", "replace").startswith(OBJ_MARKER)
    return False


def load_mesh(path: Union[str, Path]) -> MeshData:
    """A mesh file (OBJ, GLB/glTF, PLY, STL, ...) as :class:`MeshData` in recon's +z-up frame, with its appearance.

    Raises :class:`BadInput` (one line) for a missing or unreadable file, a
    mesh without faces, non-finite vertices, or faces that all have zero area.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"mesh not found: {path}")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as error:  # trimesh raises many types for unreadable files
        raise BadInput(f"cannot read mesh {path}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
    if isinstance(loaded, trimesh.Scene) and not loaded.geometry:
        raise BadInput(f"mesh {path} has no faces")
    if not isinstance(loaded, (trimesh.Trimesh, trimesh.Scene)):
        raise BadInput(f"{path} is not a triangle mesh (a point cloud or other geometry)")
    mesh = MeshData.from_trimesh(loaded)
    if is_y_up(path):
        vertices = from_y_up(mesh.vertices.double().numpy())
        mesh = mesh.with_vertices(torch.as_tensor(vertices, dtype=mesh.vertices.dtype))
    check_mesh(mesh, str(path))
    return mesh


def check_mesh(mesh: MeshData, name: str) -> None:
    """Raise :class:`BadInput` unless the mesh has faces, finite vertices and some area."""
    if mesh.faces.shape[0] == 0:
        raise BadInput(f"mesh {name} has no faces")
    if not torch.isfinite(mesh.vertices).all():
        raise BadInput(f"mesh {name} has vertices that are NaN or infinite")
    if int(mesh.faces.min()) < 0 or int(mesh.faces.max()) >= mesh.vertices.shape[0]:
        raise BadInput(f"mesh {name} has faces that refer to missing vertices")
    corners = mesh.vertices.double()[mesh.faces]
    area = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1).norm(dim=-1)
    if not (area > 1e-12 * max(float(corners.abs().max()), 1e-12) ** 2).any():
        raise BadInput(f"mesh {name} has no area (all its faces are degenerate)")
