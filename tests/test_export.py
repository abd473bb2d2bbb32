import json
import os
import pathlib
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from recon.errors import BadInput
from recon.mesh.data import MeshData
from recon.mesh.export import export_asset

# Texture quadrant colours, as seen in the image: row 0 is the top.
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)
TEX_H, TEX_W = 64, 32  # not square, so a transposed texture would show


def _y_up_to_z_up(points):
    """Undo the export's rotation: glTF (x, y, z) -> recon (z, x, y)."""
    points = np.asarray(points)
    return np.stack([points[:, 2], points[:, 0], points[:, 1]], axis=1)


def _quadrant_texture():
    texture = torch.zeros(TEX_H, TEX_W, 3)
    texture[: TEX_H // 2, : TEX_W // 2] = torch.tensor(TOP_LEFT, dtype=torch.float32)
    texture[: TEX_H // 2, TEX_W // 2 :] = torch.tensor(TOP_RIGHT, dtype=torch.float32)
    texture[TEX_H // 2 :, : TEX_W // 2] = torch.tensor(BOTTOM_LEFT, dtype=torch.float32)
    texture[TEX_H // 2 :, TEX_W // 2 :] = torch.tensor(BOTTOM_RIGHT, dtype=torch.float32)
    return texture


def _expected_colour(uv):
    """Our convention: uv (0, 0) is the bottom-left of the texture."""
    top = uv[:, 1] > 0.5
    left = uv[:, 0] < 0.5
    return np.where(
        (top & left)[:, None], TOP_LEFT, np.where((top & ~left)[:, None], TOP_RIGHT, np.where(left[:, None], BOTTOM_LEFT, BOTTOM_RIGHT))
    )


def _tall_box(seed=0):
    """A box 0.2 x 0.4 x 1.0 (tall along +z), lifted off the origin, each face corner in a random quadrant."""
    box = trimesh.creation.box(extents=(0.2, 0.4, 1.0))
    vertices = torch.tensor(box.vertices, dtype=torch.float32) + torch.tensor([0.0, 0.0, 0.3])
    faces = torch.tensor(box.faces, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    corners = faces.numel()
    uvs = torch.tensor([0.25, 0.75])[torch.randint(0, 2, (corners, 2), generator=generator)]
    return MeshData(vertices, faces, uvs=uvs, face_uvs=torch.arange(corners).reshape(-1, 3), texture=_quadrant_texture())


def _sample(image, uv):
    """Colour of a trimesh-loaded image at trimesh UVs (origin bottom-left)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    rows = ((1.0 - uv[:, 1]) * pixels.shape[0]).astype(int).clip(0, pixels.shape[0] - 1)
    cols = (uv[:, 0] * pixels.shape[1]).astype(int).clip(0, pixels.shape[1] - 1)
    return pixels[rows, cols]


def _single_mesh(path):
    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):  # a GLB: one node, one mesh, not moved
        assert len(loaded.graph.nodes_geometry) == 1 and len(loaded.geometry) == 1
        transform, name = loaded.graph[loaded.graph.nodes_geometry[0]]
        np.testing.assert_allclose(transform, np.eye(4))
        loaded = loaded.geometry[name]
    return loaded


def _check_textured(loaded, mesh, image):
    assert image.size == (TEX_W, TEX_H)
    uv = np.asarray(loaded.visual.uv)
    assert uv.shape == (len(loaded.vertices), 2)
    vertices = _y_up_to_z_up(loaded.vertices)
    np.testing.assert_allclose(vertices.min(0), mesh.vertices.min(0).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(vertices.max(0), mesh.vertices.max(0).values.numpy(), atol=1e-5)
    # Every loaded (position, uv) pair is one of the original corners' pairs...
    corners = np.concatenate(
        [mesh.vertices.numpy()[mesh.faces.numpy().reshape(-1)], mesh.uvs.numpy()[mesh.face_uvs.numpy().reshape(-1)]], axis=1
    ).astype(np.float64)
    original_pairs = np.unique(np.round(corners, 4), axis=0)
    loaded_pairs = np.round(np.concatenate([vertices, uv], axis=1), 4)
    assert len(np.unique(np.concatenate([original_pairs, loaded_pairs]), axis=0)) == len(original_pairs)
    # ...and shows the colour that UV pointed at in our convention.
    np.testing.assert_allclose(_sample(image, uv), _expected_colour(uv), atol=1e-6)
    # One vertex per distinct (position index, uv index) corner pair.
    return len(np.unique(torch.stack([mesh.faces.reshape(-1), mesh.face_uvs.reshape(-1)], 1).numpy(), axis=0))


def test_glb_round_trip_textured(tmp_path):
    mesh = _tall_box()
    written = export_asset(mesh, tmp_path, formats=("glb",))
    assert set(written) == {"glb"} and written["glb"] == tmp_path / "model.glb"
    loaded = _single_mesh(written["glb"])
    image = loaded.visual.material.baseColorTexture
    expected_vertices = _check_textured(loaded, mesh, image)
    assert len(loaded.vertices) == expected_vertices
    assert len(loaded.faces) == len(mesh.faces)
    # A proper rotation keeps the winding: still outward.
    assert loaded.volume == pytest.approx(0.2 * 0.4 * 1.0, rel=1e-4)
    material = loaded.visual.material
    assert material.metallicFactor == 0.0 and material.roughnessFactor == 1.0


def test_obj_mtl_png_round_trip_textured(tmp_path):
    mesh = _tall_box(seed=1)
    written = export_asset(mesh, tmp_path, formats=("obj",), name="chair")
    assert {p.name for p in written.values()} == {"chair.obj", "chair.mtl", "chair_texture.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chair.mtl", "chair.obj", "chair_texture.png"]
    obj_text = written["obj"].read_text()
    assert "mtllib chair.mtl" in obj_text
    assert "map_Kd chair_texture.png" in written["mtl"].read_text()  # relative: the folder can move
    assert Image.open(written["texture"]).size == (TEX_W, TEX_H)
    loaded = _single_mesh(written["obj"])
    _check_textured(loaded, mesh, loaded.visual.material.image)
    assert len(loaded.faces) == len(mesh.faces)


def test_glb_and_obj_agree(tmp_path):
    mesh = _tall_box()
    written = export_asset(mesh, tmp_path)
    glb, obj = _single_mesh(written["glb"]), _single_mesh(written["obj"])
    np.testing.assert_allclose(glb.bounds, obj.bounds, atol=1e-5)
    assert glb.volume == pytest.approx(obj.volume, rel=1e-4)


def test_input_view_faces_the_gltf_front(tmp_path):
    # a cone lying along +x (pointing at the input camera) must point at glTF's front, +z
    cone = trimesh.creation.cone(radius=0.2, height=1.0)
    vertices = torch.tensor(cone.vertices, dtype=torch.float32)[:, [2, 0, 1]]  # apex from +z to +x
    mesh = MeshData(vertices, torch.tensor(cone.faces, dtype=torch.int64))
    loaded = _single_mesh(export_asset(mesh, tmp_path, formats=("glb",))["glb"])
    apex = loaded.vertices[np.argmax(loaded.vertices[:, 2])]
    assert apex[2] == pytest.approx(1.0, abs=1e-5) and abs(apex[0]) < 1e-5 and abs(apex[1]) < 1e-5
    assert loaded.volume > 0


def test_tall_along_z_becomes_tall_along_y(tmp_path):
    # A cone standing on the xy plane with its apex at +z, shifted towards +y.
    cone = trimesh.creation.cone(radius=0.2, height=1.0)
    vertices = torch.tensor(cone.vertices, dtype=torch.float32) + torch.tensor([0.0, 0.5, 0.0])
    mesh = MeshData(vertices, torch.tensor(cone.faces, dtype=torch.int64))
    written = export_asset(mesh, tmp_path)
    for kind in ("glb", "obj"):
        loaded = _single_mesh(written[kind])
        extent = loaded.extents
        assert extent[1] == pytest.approx(1.0, abs=1e-5) and extent[0] < 0.5 and extent[2] < 0.5
        apex = loaded.vertices[np.argmax(loaded.vertices[:, 1])]
        assert apex[1] == pytest.approx(1.0, abs=1e-5)  # the apex (+z) is up (+y)
        assert loaded.vertices[:, 0].mean() == pytest.approx(0.5, abs=0.05)  # +y (the right side) went to +x
        assert loaded.volume > 0


def test_vertex_colour_mode(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.3)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    colors = (vertices / 0.6 + 0.5).clamp(0, 1)  # a smooth gradient that tells vertices apart
    mesh = MeshData(vertices, torch.tensor(sphere.faces, dtype=torch.int64), vertex_colors=colors)
    written = export_asset(mesh, tmp_path)
    assert "texture" not in written and not (tmp_path / "model_texture.png").exists()
    assert len(written["obj"].read_text().splitlines()[3].split()) == 7  # v x y z r g b
    for kind in ("glb", "obj"):
        # Through the project's own reader: trimesh files these colours beside the material.
        loaded = MeshData.from_trimesh(trimesh.load(written[kind], process=False))
        assert loaded.vertex_colors is not None and not loaded.has_texture
        # Match colours to vertices by position, whatever order the loader keeps.
        original = _y_up_to_z_up(loaded.vertices.numpy())
        nearest = np.argmin(((original[:, None, :] - vertices.numpy()[None]) ** 2).sum(-1), axis=1)
        assert np.abs(original - vertices.numpy()[nearest]).max() < 1e-5
        np.testing.assert_allclose(loaded.vertex_colors.numpy(), colors.numpy()[nearest], atol=1 / 255 + 1e-4)


def test_textured_round_trip_through_meshdata(tmp_path):
    """Our own reader sees the texture the right way up: same colour at each corner's UV."""
    mesh = _tall_box(seed=3)
    written = export_asset(mesh, tmp_path)
    for kind in ("glb", "obj"):
        loaded = MeshData.from_trimesh(trimesh.load(written[kind], process=False))
        assert loaded.has_texture and tuple(loaded.texture.shape) == (TEX_H, TEX_W, 3)
        uv = loaded.uvs[loaded.face_uvs.reshape(-1)].numpy()
        rows = ((1 - uv[:, 1]) * TEX_H).astype(int)  # our convention: v up, row 0 at the top
        cols = (uv[:, 0] * TEX_W).astype(int)
        np.testing.assert_allclose(loaded.texture.numpy()[rows, cols], _expected_colour(uv), atol=1e-6)


def test_plain_mesh_gets_a_grey_material(tmp_path):
    box = trimesh.creation.box()
    mesh = MeshData(torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces, dtype=torch.int64))
    written = export_asset(mesh, tmp_path)
    assert "Kd 0.700 0.700 0.700" in written["mtl"].read_text()
    gltf, _ = _read_glb(written["glb"].read_bytes())
    assert gltf["materials"][0]["pbrMetallicRoughness"]["baseColorFactor"] == pytest.approx([0.7, 0.7, 0.7, 1.0])


def _read_glb(data: bytes):
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and total == len(data)
    json_length, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_length % 4 == 0
    gltf = json.loads(data[20 : 20 + json_length])
    bin_start = 20 + json_length
    bin_length, bin_type = struct.unpack_from("<I4s", data, bin_start)
    assert bin_type == b"BIN\x00" and bin_length % 4 == 0
    assert bin_start + 8 + bin_length == total
    assert gltf["buffers"][0]["byteLength"] <= bin_length
    return gltf, data[bin_start + 8 : bin_start + 8 + bin_length]


def _accessor(gltf, binary, index):
    accessor = gltf["accessors"][index]
    view = gltf["bufferViews"][accessor["bufferView"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[accessor["type"]]
    dtype = {5126: "<f4", 5125: "<u4"}[accessor["componentType"]]
    assert view["byteOffset"] % 4 == 0
    assert accessor["count"] * width * 4 <= view["byteLength"]
    assert view["byteOffset"] + view["byteLength"] <= gltf["buffers"][0]["byteLength"]
    chunk = binary[view["byteOffset"] : view["byteOffset"] + accessor["count"] * width * 4]
    return np.frombuffer(chunk, dtype=dtype).reshape(accessor["count"], width), accessor


def test_glb_container_is_valid(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    faces = torch.tensor(sphere.faces, dtype=torch.int64)
    mesh = MeshData(
        torch.tensor(sphere.vertices, dtype=torch.float32),
        faces,
        uvs=torch.rand(faces.numel(), 2),
        face_uvs=torch.arange(faces.numel()).reshape(-1, 3),
        texture=torch.rand(16, 8, 3),
    )
    gltf, binary = _read_glb(export_asset(mesh, tmp_path, formats=("glb",))["glb"].read_bytes())
    assert gltf["asset"]["version"] == "2.0"
    primitive = gltf["meshes"][0]["primitives"][0]
    assert set(primitive["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0"}
    positions, position_accessor = _accessor(gltf, binary, primitive["attributes"]["POSITION"])
    np.testing.assert_allclose(position_accessor["min"], positions.min(0))
    np.testing.assert_allclose(position_accessor["max"], positions.max(0))
    normals, _ = _accessor(gltf, binary, primitive["attributes"]["NORMAL"])
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    assert (np.einsum("ij,ij->i", normals, positions) > 0).all()  # outward
    uvs, _ = _accessor(gltf, binary, primitive["attributes"]["TEXCOORD_0"])
    assert uvs.min() >= 0 and uvs.max() <= 1
    indices, _ = _accessor(gltf, binary, primitive["indices"])
    assert indices.max() < len(positions) and len(indices) == 3 * len(faces)
    image_view = gltf["bufferViews"][gltf["images"][0]["bufferView"]]
    png = binary[image_view["byteOffset"] : image_view["byteOffset"] + image_view["byteLength"]]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and gltf["images"][0]["mimeType"] == "image/png"


VALIDATOR_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / ".ci" / "gltf_validate.js"
VALIDATOR_MODULES = VALIDATOR_SCRIPT.parent / "node_modules"  # .ci/run installs gltf-validator there


@pytest.mark.skipif(shutil.which("node") is None or not (VALIDATOR_MODULES / "gltf-validator").is_dir(), reason="needs node and npm's gltf-validator (.ci/run installs them)")
@pytest.mark.parametrize("mode", ["texture", "vertex colours", "plain"])
def test_exported_glb_passes_the_khronos_validator(tmp_path, mode):
    box = _tall_box()
    if mode == "vertex colours":
        box = MeshData(box.vertices, box.faces, vertex_colors=torch.rand(len(box.vertices), 3))
    elif mode == "plain":
        box = MeshData(box.vertices, box.faces)
    glb = export_asset(box, tmp_path, formats=("glb",))["glb"]
    result = subprocess.run(["node", str(VALIDATOR_SCRIPT), str(glb)], capture_output=True, text=True, timeout=60, env={**os.environ, "NODE_PATH": str(VALIDATOR_MODULES)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == 0 and report["warnings"] == 0, report["messages"]


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    written = export_asset(_tall_box(), tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    real_write_bytes = pathlib.Path.write_bytes

    def write_half_then_fail(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_half_then_fail)
    changed = _tall_box(seed=7)
    changed.vertices = changed.vertices * 2
    with pytest.raises(OSError, match="No space"):
        export_asset(changed, tmp_path)
    monkeypatch.undo()
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary left behind
    assert _single_mesh(written["glb"]).extents[1] == pytest.approx(1.0, abs=1e-5)


def test_unknown_format_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="fbx"):
        export_asset(_tall_box(), tmp_path, formats=("glb", "fbx"))
    assert not any(tmp_path.iterdir())
