"""The engine's acceptance check: the full CPU preset on a procedural object, through the command a user runs.

This is issue 2's bar (chamfer <= 0.015, volume IoU >= 0.75, field PSNR >= 24 dB);
`python -m recon.bench.selfcheck` runs every procedural object and records the figures.
"""

import json

from recon.bench.procedural import save_obj, vase
from recon.cli import main


def test_cpu_preset_reconstructs_a_known_object(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mesh_path = save_obj(vase(), tmp_path / "vase")
    out = tmp_path / "check"
    assert main(["--reference-mesh", str(mesh_path), "--config", "cpu", "--output", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chamfer"] <= 0.015
    assert metrics["volume_iou"] >= 0.75
    assert metrics["field_psnr"] >= 24.0
    assert metrics["psnr"] >= 23.0  # the exported, textured mesh
    for name in ("model.glb", "model.obj", "preview.png", "run.json"):
        assert (out / name).is_file()
