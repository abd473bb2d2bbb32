"""How deep into occupied space rays march during a fit: the cost model's ``MARCH_DEPTH``.

    python -m recon.bench.march_depth [--config cpu] [--objects vase crate ...] [--results PATH]

Fits each procedural object as the self-check does (reference prior, CPU
preset) and reads the fit's history: the samples each ray kept after the
occupancy grid and the early stop, every tenth step, for the input view and
for the random views. Times the marching step, that is a depth in world units,
which does not depend on the step: the cost model divides it by another
preset's step to get that preset's samples per ray. Writes the mean and the
worst step per object to ``march_depth.json`` (recon/bench/results in a checkout).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from recon import pipeline
from recon.bench.procedural import OBJECTS
from recon.bench.results import default_path, machine
from recon.config import load_config
from recon.cost_model import MARCH_DEPTH
from recon.fit import read_checkpoint
from recon.io_utils import write_json_atomic
from recon.mesh.data import normalize_to_unit_cube
from recon.render.volume import step_size
from recon.run_record import new_record


def march_depths(history: list, step: float) -> dict:
    """Mean and largest depth (samples per ray x ``step``) over a fit's history, per kind of ray."""
    out = {}
    for kind in ("ref", "view"):
        values = [row[f"{kind}_samples_per_ray"] for row in history if f"{kind}_samples_per_ray" in row]
        out[kind] = {"mean": step * sum(values) / len(values), "max": step * max(values), "rows": len(values)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--objects", nargs="*", default=list(OBJECTS))
    parser.add_argument("--results", default=None, help="output JSON (default: recon/bench/results/march_depth.json in a checkout)")
    args = parser.parse_args(argv)
    # The mesh and its texture do not depend on how deep rays march: stop after the fit's checkpoint is written.
    cfg = load_config(args.config, ["prior.kind=reference", "refine.steps=0", "export.preview=false", "export.formats=[glb]"])
    step = step_size(cfg.field.radius, cfg.render)
    objects = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.objects:
            truth = normalize_to_unit_cube(OBJECTS[name]())[0]
            run_dir = Path(scratch) / name
            run_dir.mkdir()
            pipeline.self_check(truth, cfg, run_dir, new_record(run_dir, cfg, mode="reference-mesh"), quiet=True)
            objects[name] = march_depths(read_checkpoint(run_dir / pipeline.CHECKPOINT_NAME)["history"], step)
            print(f"{name:8s} " + "  ".join(f"{kind}: mean {d['mean']:.3f} max {d['max']:.3f}" for kind, d in objects[name].items()), flush=True)
    deepest = max(d["max"] for per_object in objects.values() for d in per_object.values())
    print(f"deepest mean march at any step: {deepest:.3f} world units (cost model's MARCH_DEPTH: {MARCH_DEPTH})")
    output = default_path("march_depth.json", args.results)
    write_json_atomic(output, {"config": args.config, "step": step, "objects": objects, "deepest": deepest, "march_depth_in_model": MARCH_DEPTH, "machine": machine()})
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
