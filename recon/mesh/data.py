"""A triangle mesh with optional appearance, as plain tensors.

One type travels between the stages that touch meshes (marching cubes,
texturing, export, the mesh renderer, the reference prior, the benchmark).
Appearance is one of: a UV-mapped texture, per-vertex colours, or nothing
(rendered plain grey).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np
import torch


@dataclass
class MeshData:
    vertices: torch.Tensor  # [V, 3] float32, world coordinates (z up)
    faces: torch.Tensor  # [F, 3] int64, counter-clockwise seen from outside
    vertex_colors: Optional[torch.Tensor] = None  # [V, 3] float32 in [0, 1]
    uvs: Optional[torch.Tensor] = None  # [T, 2] float32, (0, 0) = bottom-left of the texture
    face_uvs: Optional[torch.Tensor] = None  # [F, 3] int64 indices into ``uvs``
    texture: Optional[torch.Tensor] = None  # [Ht, Wt, 3] float32 in [0, 1], row 0 = top of the image

    @property
    def has_texture(self) -> bool:
        return self.texture is not None and self.uvs is not None and self.face_uvs is not None

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    def to(self, device) -> "MeshData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MeshData(*(move(getattr(self, name)) for name in ("vertices", "faces", "vertex_colors", "uvs", "face_uvs", "texture")))

    def with_vertices(self, vertices: torch.Tensor) -> "MeshData":
        return replace(self, vertices=vertices)

    @staticmethod
    def from_trimesh(mesh) -> "MeshData":
        """Geometry, and texture or vertex colours where the trimesh has them."""
        import trimesh

        if isinstance(mesh, trimesh.Scene):
            nodes = mesh.graph.nodes_geometry
            if len(nodes) == 1:
                # One mesh: take it whole, since concatenating (and copying) drops
                # vertex attributes such as glTF COLOR_0; only a moved mesh is copied.
                transform, name = mesh.graph[nodes[0]]
                geometry = mesh.geometry[name]
                mesh = geometry if np.allclose(transform, np.eye(4)) else geometry.copy().apply_transform(transform)
            else:
                mesh = mesh.dump(concatenate=True)
        vertices = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
        faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64)
        data = MeshData(vertices, faces)
        visual = mesh.visual
        if getattr(visual, "kind", None) == "texture":
            image = _material_image(visual.material) if getattr(visual, "uv", None) is not None else None
            attribute_colors = _attribute_colors(mesh)
            if image is not None:
                # trimesh keeps one uv per vertex, so uv indices are the face indices
                data.uvs = torch.as_tensor(np.asarray(visual.uv), dtype=torch.float32)
                data.face_uvs = faces.clone()
                data.texture = torch.as_tensor(image, dtype=torch.float32)
            elif attribute_colors is not None:
                # glTF COLOR_0 / OBJ vertex colours beside a material: trimesh files them as attributes
                data.vertex_colors = torch.as_tensor(attribute_colors)
            else:
                color = _material_color(visual.material)
                if color is not None:
                    data.vertex_colors = torch.as_tensor(color, dtype=torch.float32).expand(len(vertices), 3).clone()
        elif getattr(visual, "kind", None) == "vertex":
            colors = np.asarray(visual.vertex_colors)[:, :3].astype(np.float32) / 255.0
            data.vertex_colors = torch.as_tensor(colors)
        elif getattr(visual, "kind", None) == "face":
            # spread face colours to vertices (approximate; flat colours are rare in our inputs)
            face_colors = np.asarray(visual.face_colors)[:, :3].astype(np.float32) / 255.0
            colors = np.zeros((len(vertices), 3), np.float32)
            counts = np.zeros(len(vertices), np.float32)
            np.add.at(colors, np.asarray(mesh.faces).reshape(-1), np.repeat(face_colors, 3, axis=0))
            np.add.at(counts, np.asarray(mesh.faces).reshape(-1), 1.0)
            data.vertex_colors = torch.as_tensor(colors / np.maximum(counts, 1.0)[:, None])
        return data


def _material_image(material) -> Optional[np.ndarray]:
    image = getattr(material, "image", None)
    if image is None:
        image = getattr(material, "baseColorTexture", None)
    if image is None:
        return None
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return array


def _material_color(material) -> Optional[np.ndarray]:
    for name in ("main_color", "baseColorFactor", "diffuse"):
        color = getattr(material, name, None)
        if color is not None:
            color = np.asarray(color, dtype=np.float32)[:3]
            return color / 255.0 if color.max() > 1.0 else color
    return None


def _attribute_colors(mesh) -> Optional[np.ndarray]:
    for store in (getattr(mesh.visual, "vertex_attributes", {}), getattr(mesh, "vertex_attributes", {})):
        colors = store.get("color")
        if colors is not None and len(colors) == len(mesh.vertices):
            colors = np.asarray(colors)
            scale = 255.0 if np.issubdtype(colors.dtype, np.integer) else 1.0
            return (colors[:, :3].astype(np.float32) / scale).clip(0.0, 1.0)
    return None


def normalize_to_unit_cube(mesh: MeshData) -> Tuple[MeshData, float, np.ndarray]:
    """Centre the bounding box at the origin and scale its longest side to 1.

    Returns ``(normalised mesh, scale, offset)`` with
    ``normalised_vertices = vertices * scale + offset``, so a caller can map
    other geometry (a reconstruction in the same frame) the same way.
    """
    vertices = mesh.vertices.detach().cpu().numpy().astype(np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    extent = float((high - low).max())
    if extent <= 0.0:
        raise ValueError("cannot normalise a mesh whose vertices all coincide")
    scale = 1.0 / extent
    offset = -0.5 * (low + high) * scale
    new_vertices = torch.as_tensor(vertices * scale + offset, dtype=mesh.vertices.dtype, device=mesh.vertices.device)
    return mesh.with_vertices(new_vertices), scale, offset
