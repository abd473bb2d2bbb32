"""Procedural textured objects with known geometry, for tests and benchmarks.

Closed surfaces (so volume IoU is well defined) with textures that have real
structure (stripes, gradients, patches), built from formulas so nothing binary
is stored in the repository.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

from recon.mesh.data import MeshData

TEXTURE_SIZE = 256


def _grid_surface(u_count: int, v_count: int, point_fn: Callable, close_u: bool) -> tuple:
    """Vertices and faces of a (u, v) parametric surface; u wraps around when ``close_u``.

    Seam vertices are duplicated (u = 0 and u = 1) so UVs stay continuous;
    geometry duplicates are welded by index where they coincide.
    """
    u = np.linspace(0.0, 1.0, u_count + 1)
    v = np.linspace(0.0, 1.0, v_count + 1)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    points = point_fn(uu, vv)  # [u+1, v+1, 3]
    uvs = np.stack([uu, vv], axis=-1).reshape(-1, 2)
    index = np.arange((u_count + 1) * (v_count + 1)).reshape(u_count + 1, v_count + 1)
    a, b = index[:-1, :-1], index[1:, :-1]
    c, d = index[1:, 1:], index[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return points.reshape(-1, 3), faces, uvs


def _weld(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray) -> MeshData:
    """Geometry with coincident vertices merged, UVs kept per corner (seams stay sharp in UV space)."""
    key = np.round(vertices, 6)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    geometry_faces = inverse.reshape(-1)[faces]
    # drop faces that collapsed at poles
    keep = (geometry_faces[:, 0] != geometry_faces[:, 1]) & (geometry_faces[:, 1] != geometry_faces[:, 2]) & (geometry_faces[:, 0] != geometry_faces[:, 2])
    return MeshData(
        vertices=torch.as_tensor(vertices[first], dtype=torch.float32),
        faces=torch.as_tensor(geometry_faces[keep], dtype=torch.int64),
        uvs=torch.as_tensor(uvs, dtype=torch.float32),
        face_uvs=torch.as_tensor(faces[keep], dtype=torch.int64),
    )


def _texture(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> torch.Tensor:
    """A texture image from a function of (u, v); row 0 is the top (v = 1)."""
    s = TEXTURE_SIZE
    v, u = np.meshgrid((np.arange(s)[::-1] + 0.5) / s, (np.arange(s) + 0.5) / s, indexing="ij")
    return torch.as_tensor(np.clip(fn(u, v), 0.0, 1.0), dtype=torch.float32)


def vase() -> MeshData:
    """A surface of revolution (closed top and bottom) with horizontal bands and a hue sweep."""

    def point(u, v):
        # v runs bottom-pole -> side -> top-pole; the profile radius vanishes at both ends
        height = -0.5 + v
        profile = 0.22 + 0.12 * np.sin(math.pi * v * 1.6 + 0.3) + 0.06 * np.cos(3 * math.pi * v)
        radius = profile * np.sin(math.pi * v) ** 0.35
        angle = 2 * math.pi * u
        return np.stack([radius * np.cos(angle), radius * np.sin(angle), height], axis=-1)

    mesh = _weld(*_grid_surface(64, 48, point, close_u=True))

    def colour(u, v):
        bands = 0.5 + 0.5 * np.sign(np.sin(2 * math.pi * 4 * v))
        base = np.stack([0.85 - 0.6 * u, 0.3 + 0.5 * v, 0.2 + 0.6 * u], axis=-1)
        accent = np.array([0.95, 0.85, 0.3])
        return base * bands[..., None] + accent * (1 - bands[..., None])

    mesh.texture = _texture(colour)
    return mesh


def torus() -> MeshData:
    """A torus lying on the ground plane, with checker patches around its ring."""

    def point(u, v):
        big, small = 0.34, 0.14
        a, b = 2 * math.pi * u, 2 * math.pi * v
        return np.stack([(big + small * np.cos(b)) * np.cos(a), (big + small * np.cos(b)) * np.sin(a), small * np.sin(b)], axis=-1)

    mesh = _weld(*_grid_surface(72, 32, point, close_u=True))

    def colour(u, v):
        checker = ((np.floor(u * 8) + np.floor(v * 4)) % 2)[..., None]
        red = np.array([0.8, 0.15, 0.15])
        cream = np.array([0.95, 0.9, 0.75])
        return checker * red + (1 - checker) * cream

    mesh.texture = _texture(colour)
    return mesh


def crate() -> MeshData:
    """A box with a different gradient-and-stripe pattern on each face (24 vertices, per-face UVs)."""
    half = np.array([0.4, 0.3, 0.25])
    # each face: origin corner and two edge directions spanning it, counter-clockwise from outside
    corners = np.array(
        [
            [[1, -1, -1], [0, 2, 0], [0, 0, 2]],  # +x
            [[-1, 1, -1], [0, -2, 0], [0, 0, 2]],  # -x
            [[1, 1, -1], [-2, 0, 0], [0, 0, 2]],  # +y
            [[-1, -1, -1], [2, 0, 0], [0, 0, 2]],  # -y
            [[-1, -1, 1], [2, 0, 0], [0, 2, 0]],  # +z
            [[-1, 1, -1], [2, 0, 0], [0, -2, 0]],  # -z
        ],
        dtype=np.float64,
    )
    unit = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    vertices = (corners[:, None, 0] + unit[None, :, :1] * corners[:, None, 1] + unit[None, :, 1:] * corners[:, None, 2]) * half
    # lay the six faces out in a 3x2 atlas
    tile = np.stack([np.arange(6) % 3, np.arange(6) // 3], axis=-1)
    margin = 0.02
    uvs = (tile[:, None, :] + margin + unit[None] * (1 - 2 * margin)) / np.array([3.0, 2.0])
    quads = np.arange(24).reshape(6, 4)
    faces = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    mesh = _weld(vertices.reshape(-1, 3), faces, uvs.reshape(-1, 2))

    def colour(u, v):
        face = (np.floor(u * 3) + 3 * np.floor(v * 2)).clip(0, 5)
        hue = face / 6.0
        base = np.stack([0.5 + 0.4 * np.cos(2 * math.pi * hue), 0.5 + 0.4 * np.cos(2 * math.pi * (hue - 1 / 3)), 0.5 + 0.4 * np.cos(2 * math.pi * (hue - 2 / 3))], -1)
        stripe = (np.sin(2 * math.pi * 6 * (u * 3 % 1)) > 0.3)[..., None]
        return np.where(stripe, base * 0.45, base)

    mesh.texture = _texture(colour)
    return mesh


def pebble() -> MeshData:
    """A lumpy closed blob coloured per vertex by position."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    v = np.asarray(sphere.vertices)
    bumps = 1.0 + 0.12 * np.sin(3 * v[:, 0] + 1.0) * np.cos(2 * v[:, 1]) + 0.08 * np.sin(4 * v[:, 2])
    vertices = v * bumps[:, None] * np.array([0.45, 0.35, 0.3])
    colours = np.stack([0.5 + 0.4 * v[:, 0], 0.45 + 0.35 * np.sin(2.5 * v[:, 1]), 0.5 - 0.4 * v[:, 2]], -1).clip(0, 1)
    return MeshData(
        vertices=torch.as_tensor(vertices, dtype=torch.float32),
        faces=torch.as_tensor(np.asarray(sphere.faces), dtype=torch.int64),
        vertex_colors=torch.as_tensor(colours, dtype=torch.float32),
    )


OBJECTS: Dict[str, Callable[[], MeshData]] = {"vase": vase, "torus": torus, "crate": crate, "pebble": pebble}


def save_obj(mesh: MeshData, folder: Path, name: str = "model") -> Path:
    """Write a textured mesh as OBJ + MTL + PNG in its own +z-up frame (the GSO layout's convention)."""
    import trimesh
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if mesh.has_texture:
        # trimesh wants one uv per vertex: split vertices along the uv seams
        corners = mesh.faces.reshape(-1).numpy()
        uv_corners = mesh.face_uvs.reshape(-1).numpy()
        pairs, inverse = np.unique(np.stack([corners, uv_corners], -1), axis=0, return_inverse=True)
        vertices = mesh.vertices.numpy()[pairs[:, 0]]
        uvs = mesh.uvs.numpy()[pairs[:, 1]]
        faces = inverse.reshape(-1, 3)
        image = Image.fromarray((mesh.texture.numpy() * 255).round().astype(np.uint8))
        visual = trimesh.visual.TextureVisuals(uv=uvs, image=image)
        out = trimesh.Trimesh(vertices, faces, visual=visual, process=False)
    else:
        colours = None if mesh.vertex_colors is None else (mesh.vertex_colors.numpy() * 255).round().astype(np.uint8)
        out = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), vertex_colors=colours, process=False)
    path = folder / f"{name}.obj"
    out.export(path)
    return path
