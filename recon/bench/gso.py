"""Google Scanned Objects as distributed: listing and loading the objects of a dataset folder.

Each object is a folder, or a ``.zip`` of that folder's contents, holding::

    meshes/model.obj
    meshes/model.mtl                  (its map_Kd names texture.png)
    materials/textures/texture.png

GSO meshes are +z up like our world, so they are only normalised to the unit
cube (bounding box centred at the origin, longest side 1), as the SyncDreamer
protocol does before scoring. The photos and views the benchmark renders of
them are :mod:`recon.eval.truth`'s.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from recon.errors import BadInput
from recon.mesh.data import MeshData, normalize_to_unit_cube

MESH_FILE = "meshes/model.obj"
TEXTURE_DIR = "materials/textures"

PathLike = Union[str, Path]


def object_name(path: PathLike) -> str:
    """An object's name: its folder's name, or its zip file's name without ``.zip``."""
    path = Path(path)
    return path.stem if path.suffix.lower() == ".zip" else path.name


def _is_object(path: Path) -> bool:
    if path.is_dir():
        return (path / MESH_FILE).is_file()
    return path.is_file() and path.suffix.lower() == ".zip"


def read_object_list(objects_file: PathLike) -> List[str]:
    """Names from a text file, one a line; blank lines and ``#`` comments are ignored."""
    path = Path(objects_file)
    if not path.is_file():
        raise BadInput(f"object list not found: {path}")
    names = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [name for name in names if name]


def list_objects(data_root: PathLike, objects_file: Optional[PathLike] = None) -> List[Path]:
    """The objects under ``data_root`` (folders with ``meshes/model.obj``, or ``.zip`` files), sorted by name.

    With ``objects_file`` only the objects it names, in its order; a name with
    no folder or zip under ``data_root`` is an error (a silently shorter
    benchmark would not be comparable).
    """
    root = Path(data_root)
    if not root.is_dir():
        raise BadInput(f"GSO data root is not a folder: {root}")
    found = {}
    for path in sorted(root.iterdir()):
        if _is_object(path):
            # A folder wins over a zip of the same name: it is already extracted.
            if object_name(path) not in found or path.is_dir():
                found[object_name(path)] = path
    if objects_file is None:
        if not found:
            raise BadInput(f"no GSO objects under {root} (expected <name>/{MESH_FILE} or <name>.zip)")
        return [found[name] for name in sorted(found)]
    names = read_object_list(objects_file)
    missing = [name for name in names if name not in found]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise BadInput(f"{len(missing)} object(s) from {objects_file} not found under {root}: {shown}")
    return [found[name] for name in dict.fromkeys(names)]  # keep order, drop repeats


class _ObjectResolver:
    """Finds the files an OBJ refers to: beside the mesh first, then in GSO's texture folder.

    GSO's ``model.mtl`` names ``texture.png`` with no folder, while the file
    lives in ``materials/textures/``. Only base names are looked up, so a
    material file cannot reach outside the object's folder.
    """

    def __init__(self, object_dir: Path):
        self.folders = [object_dir / "meshes", object_dir / TEXTURE_DIR]

    def get(self, name: str) -> bytes:
        for folder in self.folders:
            candidate = folder / Path(name.strip().replace("\\", "/")).name
            if candidate.is_file():
                return candidate.read_bytes()
        raise FileNotFoundError(name)

    __getitem__ = get  # trimesh's OBJ reader indexes the resolver


def _load_folder(object_dir: Path) -> MeshData:
    import trimesh

    mesh_path = object_dir / MESH_FILE
    if not mesh_path.is_file():
        raise BadInput(f"not a GSO object (no {MESH_FILE}): {object_dir}")
    try:
        loaded = trimesh.load(mesh_path, process=False, resolver=_ObjectResolver(object_dir))
    except Exception as error:  # trimesh raises many types for unreadable files
        raise BadInput(f"cannot read {mesh_path}: {error}") from None
    mesh = MeshData.from_trimesh(loaded)
    if mesh.faces.shape[0] == 0:
        raise BadInput(f"{mesh_path} has no faces")
    # trimesh only logs a material it cannot read; an untextured ground truth
    # would silently change every image metric, so say so.
    if any((object_dir / TEXTURE_DIR).glob("*.png")) and not mesh.has_texture:
        raise BadInput(f"{mesh_path}: the texture in {TEXTURE_DIR}/ could not be applied (check model.mtl's map_Kd)")
    return mesh


def _object_root_in_zip(archive: zipfile.ZipFile) -> str:
    """The folder inside the zip that holds ``meshes/model.obj`` ('' when at the top)."""
    roots = [name[: -len(MESH_FILE)] for name in archive.namelist() if name == MESH_FILE or name.endswith("/" + MESH_FILE)]
    if not roots:
        raise BadInput(f"not a GSO object (no {MESH_FILE} inside): {archive.filename}")
    return min(roots, key=len)


def load_gso_object(path: PathLike, normalize: bool = True) -> MeshData:
    """One GSO object (folder or zip) as a textured mesh, normalised to the unit cube unless told not to."""
    path = Path(path)
    if path.is_dir():
        mesh = _load_folder(path)
    elif path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="gso-") as temporary:
                root = _object_root_in_zip(archive)
                members = [name for name in archive.namelist() if name.startswith(root)]
                archive.extractall(temporary, members=members)  # zipfile refuses paths that escape the folder
                mesh = _load_folder(Path(temporary) / root)  # everything is in memory before the folder goes
        except zipfile.BadZipFile as error:
            raise BadInput(f"cannot read {path}: {error}") from None
    else:
        raise BadInput(f"not a GSO object folder or zip: {path}")
    return normalize_to_unit_cube(mesh)[0] if normalize else mesh


def objects_to_paths(data_root: PathLike, names: Sequence[str]) -> List[Path]:
    """Paths of named objects under ``data_root`` (for callers that hold names, not an object-list file)."""
    found = {object_name(path): path for path in list_objects(data_root)}
    missing = [name for name in names if name not in found]
    if missing:
        raise BadInput(f"object(s) not found under {data_root}: {', '.join(missing)}")
    return [found[name] for name in names]
