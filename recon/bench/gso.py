"""Google Scanned Objects as distributed: listing and loading the objects of a dataset folder.

Each object is a folder, or a ``.zip`` of that folder's contents, holding::

    meshes/model.obj
    meshes/model.mtl                  (its map_Kd names texture.png)
    materials/textures/texture.png

GSO meshes are +z up like our world, so they are only normalised to the unit
cube (bounding box centred at the origin, longest side 1), as the SyncDreamer
protocol does before scoring. The photos and views the benchmark renders of
them are :mod:`recon.eval.truth`'s.

A zipped object is unpacked member by member under two caps (one member, the
whole object), counted on the bytes actually written, so a small hostile zip
cannot fill the disk or the memory of the process that reads it.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

from recon.errors import BadInput
from recon.mesh.data import MeshData, normalize_to_unit_cube

MESH_FILE = "meshes/model.obj"
TEXTURE_DIR = "materials/textures"

PathLike = Union[str, Path]

# Caps on unpacking one zipped object, in MiB (> 0). A GSO object is a few MB
# to a few tens of MB unpacked; these leave ample room for large scans while
# stopping a zip bomb long before it exhausts disk or memory.
MAX_MEMBER_MB = 512  # one file inside the zip
MAX_ARCHIVE_MB = 1024  # all files of the object together
_CHUNK = 1 << 20  # bytes copied per read while unpacking


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


def _mb(size: int) -> str:
    """A size in bytes as MiB for messages (the caps are given in MiB)."""
    return f"{size / (1 << 20):g}"


def _member_target(destination: Path, name: str, archive_path: Path) -> Path:
    """Where member ``name`` goes under ``destination``; a name that would land outside it is refused.

    zipfile's own extractall rewrites such names silently; since every member
    is written here by hand, the check is explicit: an absolute name or a
    ``..`` part makes the object a bad input rather than a file elsewhere.
    """
    parts = name.replace("\\", "/").split("/")
    target = destination.joinpath(*[part for part in parts if part not in ("", ".")])
    if parts[0] == "" or ".." in parts or not target.resolve().is_relative_to(destination.resolve()):
        raise BadInput(f"{archive_path.name}: member {name!r} points outside the object's folder")
    return target


def _copy_capped(source, target: Path, name: str, archive_path: Path, member_cap: int, total_before: int, total_cap: int) -> int:
    """Copy one member's bytes from ``source`` to ``target`` in chunks; the number of bytes written.

    The count is taken on the bytes actually read, not on the zip header's
    declared size, so a header that lies cannot carry a member past the caps:
    the copy stops as soon as the member passes ``member_cap`` bytes or the
    object, with the ``total_before`` bytes of its earlier members, passes
    ``total_cap``. (Python's reader also stops at the declared size and then
    fails the CRC check; this count does not rely on that.)
    """
    written = 0
    with open(target, "wb") as out:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return written
            written += len(chunk)
            if written > member_cap:
                raise BadInput(f"{archive_path.name}: member {name!r} unpacks to more than the {_mb(member_cap)} MB cap per member (max_member_mb)")
            if total_before + written > total_cap:
                raise BadInput(f"{archive_path.name}: unpacking member {name!r} passes the {_mb(total_cap)} MB cap per object (max_archive_mb)")
            out.write(chunk)


def _unpack(archive: zipfile.ZipFile, root: str, destination: Path, archive_path: Path, member_cap: int, total_cap: int) -> None:
    """Write the members under ``root`` into ``destination``, within the caps (bytes).

    The declared sizes are checked first, so an honest oversized zip is
    refused before anything is written; the copy then counts real bytes (see
    :func:`_copy_capped`), which catches a header that understates them.
    """
    members = [info for info in archive.infolist() if info.filename.startswith(root)]
    declared = 0
    for info in members:
        declared += info.file_size
        if info.file_size > member_cap:
            raise BadInput(f"{archive_path.name}: member {info.filename!r} is {_mb(info.file_size)} MB unpacked, over the {_mb(member_cap)} MB cap per member (max_member_mb)")
        if declared > total_cap:
            raise BadInput(f"{archive_path.name}: member {info.filename!r} takes the object to {_mb(declared)} MB unpacked, over the {_mb(total_cap)} MB cap per object (max_archive_mb)")
    total = 0
    for info in members:
        target = _member_target(destination, info.filename, archive_path)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source:
            total += _copy_capped(source, target, info.filename, archive_path, member_cap, total, total_cap)


def _load_zip(path: Path, unpack_dir: Path, member_cap: int, total_cap: int) -> MeshData:
    """Unpack a zipped object into ``unpack_dir`` (created here, removed here whatever happens) and load it."""
    shutil.rmtree(unpack_dir, ignore_errors=True)  # leftovers of a process killed while unpacking
    unpack_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(path) as archive:
            root = _object_root_in_zip(archive)
            _unpack(archive, root, unpack_dir, path, member_cap, total_cap)
        return _load_folder(unpack_dir / root)  # everything is in memory before the folder goes
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as error:
        # a damaged zip, or one using a compression or encryption zipfile cannot read
        raise BadInput(f"cannot read {path}: {error}") from None
    finally:
        shutil.rmtree(unpack_dir, ignore_errors=True)


def load_gso_object(
    path: PathLike,
    normalize: bool = True,
    unpack_dir: Optional[PathLike] = None,
    max_member_mb: float = MAX_MEMBER_MB,
    max_archive_mb: float = MAX_ARCHIVE_MB,
) -> MeshData:
    """One GSO object (folder or zip) as a textured mesh, normalised to the unit cube unless told not to.

    A zip is unpacked into ``unpack_dir`` when given, else into a fresh
    temporary folder; either is removed before this returns or raises. The
    benchmark passes a folder inside the object's run folder, so that the
    leftovers of a worker killed mid-unpack are found and removed by the next
    run instead of piling up in the system's temporary folder. A member larger
    than ``max_member_mb`` MiB, or an object larger than ``max_archive_mb``
    MiB in all, is a :class:`BadInput` naming the member and the cap.
    """
    path = Path(path)
    if not (max_member_mb > 0 and max_archive_mb > 0):
        raise BadInput(f"the unpacking caps must be positive (max_member_mb={max_member_mb}, max_archive_mb={max_archive_mb})")
    if path.is_dir():
        mesh = _load_folder(path)
    elif path.is_file() and path.suffix.lower() == ".zip":
        member_cap, total_cap = int(max_member_mb * (1 << 20)), int(max_archive_mb * (1 << 20))
        if unpack_dir is not None:
            mesh = _load_zip(path, Path(unpack_dir), member_cap, total_cap)
        else:
            with tempfile.TemporaryDirectory(prefix="gso-") as temporary:
                mesh = _load_zip(path, Path(temporary) / "object", member_cap, total_cap)
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
