"""Writing files so that readers never see a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
PARTIAL = ".partial"  # in the names of files being written; what a killed process leaves behind


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_partials(directory: PathLike) -> int:
    """Delete the half-written files a killed run left in ``directory``; returns how many."""
    stale = [p for p in Path(directory).glob(f".*{PARTIAL}*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary name keeps the suffix, so libraries that pick a format from
    the extension (imageio, trimesh) still do the right thing. On any failure
    the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{PARTIAL}{path.suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs follow the user's umask
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(path: PathLike, value) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))


def save_rgba_png(path: PathLike, rgba) -> None:
    """Write an RGBA image [H, W, 4] in [0, 1] (tensor or array) as an 8-bit PNG, atomically."""
    import numpy as np
    from PIL import Image

    values = rgba.detach().cpu().numpy() if hasattr(rgba, "detach") else np.asarray(rgba)
    pixels = (np.clip(values, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    with atomic_path(path) as temporary:
        Image.fromarray(pixels, "RGBA").save(temporary, format="PNG")
