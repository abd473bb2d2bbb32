"""Mesh -> files a user opens: binary glTF (GLB) and OBJ + MTL + PNG.

Orientation: recon's world is +z up with the input view looking from +x;
glTF is +y up with its front facing +z (where viewers put their default
camera), and Blender's OBJ importer assumes +y up, forward -z. Both files are
therefore written with the same proper rotation ``(x, y, z) -> (y, z, x)``
(:data:`recon.mesh.io.Z_UP_TO_Y_UP`, whose inverse ``load_mesh`` applies):
+z becomes +y (upright), +x becomes +z (the side the photo showed faces the
viewer) and +y becomes +x (the object's right stays on the viewer's right),
so the two files agree and open the way the input photo looked in Blender,
three.js and model-viewer.

Texture coordinates: ``MeshData.uvs`` has (0, 0) at the bottom-left of the
texture and the texture's row 0 is its top. OBJ shares that convention (vt
origin bottom-left, image as stored), glTF puts the UV origin at the top-left
of the image, so glTF gets ``v -> 1 - v``; the PNG is the same in both.

Appearance: a UV texture (``base colour`` map, embedded in the GLB, a PNG
beside the OBJ), else vertex colours (glTF ``COLOR_0``; OBJ ``v x y z r g b``),
else a plain light grey. The material is PBR with metallic 0 and roughness 1:
the baked colour already carries the object's look, so it should not gain
reflections.

Every file is written to a temporary name and renamed into place
(:func:`recon.io_utils.atomic_path`), the OBJ last, so a model.obj on disk
always has its MTL and texture beside it and an interrupted run never leaves a
truncated model.glb.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import torch
from PIL import Image

from recon.errors import BadInput
from recon.io_utils import write_bytes_atomic
from recon.mesh.data import MeshData
from recon.mesh.io import OBJ_MARKER, to_y_up

FORMATS = ("glb", "obj")
PLAIN_GREY = (0.7, 0.7, 0.7)


# glTF constants (glTF 2.0 specification, section 5)
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_TRIANGLES = 4


def export_asset(
    mesh: MeshData,
    run_dir: Path,
    formats: Iterable[str] = FORMATS,
    name: str = "model",
) -> Dict[str, Path]:
    """Write the mesh as ``{name}.glb`` and/or ``{name}.obj`` (+ ``.mtl``, ``_texture.png``).

    Returns the written paths by kind: ``glb``, ``obj``, ``mtl``, ``texture``.
    """
    formats = [f.lower() for f in formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise BadInput(f"unknown export format(s) {', '.join(unknown)} (known: {', '.join(FORMATS)})")
    run_dir = Path(run_dir)
    mesh = mesh.to("cpu")
    written: Dict[str, Path] = {}
    if "glb" in formats:
        written["glb"] = run_dir / f"{name}.glb"
        write_bytes_atomic(written["glb"], glb_bytes(mesh))
    if "obj" in formats:
        written.update(_write_obj(mesh, run_dir, name))
    return written


# ---------------------------------------------------------------- shared helpers


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (the unnormalised face normal is twice the area)."""
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    np.add.at(normals, faces.reshape(-1), np.repeat(face_normals, 3, axis=0))
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    # An unreferenced or fully degenerate vertex gets an arbitrary unit normal, never NaN.
    return np.where(length > 1e-20, normals / np.maximum(length, 1e-20), np.array([0.0, 0.0, 1.0]))


def texture_png(texture: torch.Tensor) -> bytes:
    pixels = (texture.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _colors(mesh: MeshData) -> Optional[np.ndarray]:
    if mesh.has_texture or mesh.vertex_colors is None:
        return None
    return mesh.vertex_colors.clamp(0, 1).numpy().astype(np.float32)


# ---------------------------------------------------------------- GLB


def glb_bytes(mesh: MeshData) -> bytes:
    """One mesh, one material, +y up, as a self-contained binary glTF 2.0 file."""
    vertices = mesh.vertices.numpy().astype(np.float64)
    faces = mesh.faces.numpy().astype(np.int64)
    normals = vertex_normals(vertices, faces)
    colors = _colors(mesh)
    uvs = None
    if mesh.has_texture:
        # glTF has one index per corner for all attributes: split the vertices
        # where a UV seam gives one position several texture coordinates.
        corners = np.stack([faces.reshape(-1), mesh.face_uvs.numpy().reshape(-1)], axis=1)
        unique, inverse = np.unique(corners, axis=0, return_inverse=True)
        position_index, uv_index = unique[:, 0], unique[:, 1]
        faces = inverse.reshape(-1, 3)
        vertices, normals = vertices[position_index], normals[position_index]
        uvs = mesh.uvs.numpy()[uv_index].astype(np.float32)
        uvs = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1)  # glTF's UV origin is top-left

    builder = _GlbBuilder()
    positions = to_y_up(vertices).astype(np.float32)
    attributes = {
        "POSITION": builder.accessor(positions, "VEC3", _ARRAY_BUFFER, bounds=True),
        "NORMAL": builder.accessor(to_y_up(normals).astype(np.float32), "VEC3", _ARRAY_BUFFER),
    }
    material = {"name": "material0", "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 1.0}}
    if uvs is not None:
        attributes["TEXCOORD_0"] = builder.accessor(uvs, "VEC2", _ARRAY_BUFFER)
        image_view = builder.buffer_view(texture_png(mesh.texture), target=None)
        builder.gltf["images"] = [{"bufferView": image_view, "mimeType": "image/png"}]
        builder.gltf["samplers"] = [
            {"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}
        ]
        builder.gltf["textures"] = [{"sampler": 0, "source": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}
    elif colors is not None:
        attributes["COLOR_0"] = builder.accessor(colors, "VEC3", _ARRAY_BUFFER)
    else:
        material["pbrMetallicRoughness"]["baseColorFactor"] = [*PLAIN_GREY, 1.0]
    indices = builder.accessor(faces.reshape(-1).astype(np.uint32), "SCALAR", _ELEMENT_ARRAY_BUFFER)

    builder.gltf.update(
        scene=0,
        scenes=[{"nodes": [0]}],
        nodes=[{"mesh": 0, "name": "model"}],
        meshes=[{"name": "model", "primitives": [{"attributes": attributes, "indices": indices, "material": 0, "mode": _TRIANGLES}]}],
        materials=[material],
    )
    return builder.to_bytes()


class _GlbBuilder:
    """Accumulates buffer views and accessors in one binary buffer."""

    def __init__(self):
        self.gltf = {"asset": {"version": "2.0", "generator": "recon"}, "bufferViews": [], "accessors": []}
        self.chunks = []
        self.length = 0

    def buffer_view(self, data: bytes, target: Optional[int]) -> int:
        view = {"buffer": 0, "byteOffset": self.length, "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        # Every view starts on a 4-byte boundary, as accessors of 4-byte components need.
        padded = data + b"\x00" * (-len(data) % 4)
        self.chunks.append(padded)
        self.length += len(padded)
        self.gltf["bufferViews"].append(view)
        return len(self.gltf["bufferViews"]) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int, bounds: bool = False) -> int:
        component = _UINT32 if array.dtype == np.uint32 else _FLOAT
        array = np.ascontiguousarray(array, dtype="<u4" if component == _UINT32 else "<f4")
        accessor = {
            "bufferView": self.buffer_view(array.tobytes(), target),
            "componentType": component,
            "count": int(array.shape[0]),
            "type": kind,
        }
        if bounds:  # required for POSITION
            accessor["min"] = array.min(axis=0).tolist()
            accessor["max"] = array.max(axis=0).tolist()
        self.gltf["accessors"].append(accessor)
        return len(self.gltf["accessors"]) - 1

    def to_bytes(self) -> bytes:
        binary = b"".join(self.chunks)
        self.gltf["buffers"] = [{"byteLength": len(binary)}]
        text = json.dumps(self.gltf, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 4)  # the JSON chunk is padded with spaces
        total = 12 + 8 + len(text) + 8 + len(binary)
        header = struct.pack("<4sII", b"glTF", 2, total)
        return header + struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(binary), b"BIN\x00") + binary


# ---------------------------------------------------------------- OBJ


def _write_obj(mesh: MeshData, run_dir: Path, name: str) -> Dict[str, Path]:
    written: Dict[str, Path] = {}
    material = "material0"
    mtl = [f"newmtl {material}", "Ka 0 0 0", "Ks 0 0 0", "illum 1"]  # illum 1: diffuse only, no highlights
    if mesh.has_texture:
        written["texture"] = run_dir / f"{name}_texture.png"
        write_bytes_atomic(written["texture"], texture_png(mesh.texture))
        mtl += ["Kd 1 1 1", f"map_Kd {written['texture'].name}"]
    elif mesh.vertex_colors is not None:
        mtl += ["Kd 1 1 1"]
    else:
        mtl += ["Kd {:.3f} {:.3f} {:.3f}".format(*PLAIN_GREY)]
    written["mtl"] = run_dir / f"{name}.mtl"
    write_bytes_atomic(written["mtl"], ("\n".join(mtl) + "\n").encode("ascii"))
    written["obj"] = run_dir / f"{name}.obj"
    write_bytes_atomic(written["obj"], obj_text(mesh, written["mtl"].name, material).encode("ascii"))
    return written


def obj_text(mesh: MeshData, mtl_name: str, material: str = "material0") -> str:
    """Wavefront OBJ text, +y up, with texture coordinates or vertex colours where the mesh has them."""
    vertices = mesh.vertices.numpy().astype(np.float64)
    faces = mesh.faces.numpy().astype(np.int64)
    normals = to_y_up(vertex_normals(vertices, faces))
    colors = _colors(mesh)
    positions = to_y_up(vertices)
    lines = [f"{OBJ_MARKER}, front (the input view) towards +z, as Blender's OBJ importer expects", f"mtllib {mtl_name}", "o model"]
    if colors is not None:
        lines.append(_rows("v %.6f %.6f %.6f %.4f %.4f %.4f", np.concatenate([positions, colors], axis=1)))
    else:
        lines.append(_rows("v %.6f %.6f %.6f", positions))
    lines.append(_rows("vn %.5f %.5f %.5f", normals))
    if mesh.has_texture:
        lines.append(_rows("vt %.6f %.6f", mesh.uvs.numpy()))  # same origin as ours: bottom-left
        corners = np.stack([faces, mesh.face_uvs.numpy(), faces], axis=2).reshape(-1, 9) + 1  # v/vt/vn, 1-based
        face_format = "f %d/%d/%d %d/%d/%d %d/%d/%d"
    else:
        corners = np.stack([faces, faces], axis=2).reshape(-1, 6) + 1  # v//vn
        face_format = "f %d//%d %d//%d %d//%d"
    lines += [f"usemtl {material}", _rows(face_format, corners)]
    return "\n".join(line for line in lines if line) + "\n"


def _rows(row_format: str, array: np.ndarray) -> str:
    """Format every row of ``array`` in one C-level %-operation (no Python loop over rows)."""
    if len(array) == 0:
        return ""
    return ((row_format + "\n") * len(array) % tuple(array.reshape(-1).tolist())).rstrip("\n")
