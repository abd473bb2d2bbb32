"""How far the image path's frame map is from exact: ``python -m recon.bench.frames_error [--config cpu]``.

The map from the fit frame to the photo's world (recon/frames.py) is a
weak-perspective approximation. For each procedural object photographed with
the evaluation protocol's camera at a few elevations, this prepares the photo
as a run does, maps the true mesh into the fit frame, and measures how far
each vertex's projection by the fit's reference camera lands from the same
vertex in the prepared photo, in pixels of the prepared view. Prints a table
and writes ``frames_reprojection.json`` (recon/bench/results in a checkout).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image

from recon.bench.procedural import OBJECTS
from recon.bench.results import default_path, machine
from recon.camera import Cameras, project
from recon.config import load_config
from recon.eval.truth import photo_camera, render_photo
from recon.frames import fit_to_photo_world
from recon.io_utils import write_json_atomic
from recon.mesh.data import normalize_to_unit_cube
from recon.prepare import prepare_reference


def reprojection_error(name: str, cfg) -> dict:
    """Mean and max pixel distance between the prepared photo and the fit camera's view of the mapped truth."""
    truth = normalize_to_unit_cube(OBJECTS[name]())[0]
    camera = photo_camera(cfg)
    rgba = render_photo(truth, camera)
    image = Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), "RGBA")
    view = prepare_reference(image, np.asarray(image.getchannel("A")) >= 128, cfg.prepare.border_ratio, cfg.prepare.size)
    fit_to_world = fit_to_photo_world(view.recentring, camera, cfg.camera.distance, cfg.camera.fovy)
    in_photo, _ = project(truth.vertices, Cameras.make(camera.elevation, 0.0, camera.distance, camera.fovy), camera.height, camera.width)
    fit_camera = Cameras.make(camera.elevation, 0.0, cfg.camera.distance, cfg.camera.fovy)
    in_fit, _ = project(fit_to_world.inverse().apply(truth.vertices), fit_camera, cfg.prepare.size)
    error = (view.recentring.apply(in_photo[0]) - in_fit[0]).norm(dim=-1)
    return {"mean_px": round(float(error.mean()), 3), "max_px": round(float(error.max()), 3), "recentring_scale": round(view.recentring.scale, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--elevations", nargs="*", type=float, default=[0.0, 30.0])
    parser.add_argument("--results", default=None, help="output JSON (default: recon/bench/results/frames_reprojection.json in a checkout)")
    args = parser.parse_args(argv)
    rows = {}
    for elevation in args.elevations:
        cfg = load_config(args.config, [f"camera.reference_elevation={elevation}"])
        for name in OBJECTS:
            rows[f"{name}@{elevation:g}"] = row = reprojection_error(name, cfg)
            print(f"{name:8s} elevation {elevation:5.1f}: mean {row['mean_px']:6.2f} px, max {row['max_px']:6.2f} px (recentring x{row['recentring_scale']})")
    base = load_config(args.config)
    out = default_path("frames_reprojection.json", args.results)
    write_json_atomic(out, {
        "config": args.config,
        "photo_camera": {"distance": base.eval.distance, "fovy": base.eval.fovy, "resolution": base.eval.resolution},
        "fit_camera": {"distance": base.camera.distance, "fovy": base.camera.fovy, "prepared_size": base.prepare.size},
        "objects": rows,
        "machine": machine(),
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
