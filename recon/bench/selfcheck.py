"""The self-check over every procedural object: `python -m recon.bench.selfcheck [--config cpu] [--profile] [key=value ...]`.

Photographs each object and reconstructs the photo through the image path
with the reference prior (no diffusion weights needed), exports it, scores it, prints a table and writes the figures with a description
of the machine to ``selfcheck_<preset>.json`` (``recon/bench/results/`` in a
checkout; ``--results`` elsewhere). ``--profile`` adds, per object, the
functions that took the most time (cProfile, own time) to that file.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

from recon import pipeline
from recon.bench.procedural import OBJECTS
from recon.bench.results import default_path, machine
from recon.config import load_config, to_dict
from recon.device import choose_device
from recon.io_utils import write_json_atomic
from recon.mesh.data import normalize_to_unit_cube
from recon.run_record import new_record

# psnr_before_refine: the mesh as baked, before refinement (absent with refine.steps=0)
COLUMNS = ("chamfer", "volume_iou", "fscore", "field_psnr", "psnr", "psnr_before_refine", "ssim", "faces", "seconds")
PROFILE_TOP = 15


def profile_summary(profile: cProfile.Profile, top: int = PROFILE_TOP) -> List[dict]:
    """The ``top`` functions by own time (excluding callees): where the seconds actually go."""
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_seconds": round(own, 3), "cumulative_seconds": round(cumulative, 3)})
    return sorted(rows, key=lambda row: -row["own_seconds"])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--objects", nargs="*", default=list(OBJECTS))
    parser.add_argument("--results", default=None, help="output JSON (default: recon/bench/results/selfcheck_<config>.json in a checkout, else ./selfcheck_<config>.json)")
    parser.add_argument("--profile", action="store_true", help="also record where each object's time went (cProfile; adds a little overhead)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["prior.kind=reference"] + list(args.overrides))
    device = choose_device(cfg.device)
    rows = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.objects:
            gt = normalize_to_unit_cube(OBJECTS[name]())[0]
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            run_dir = Path(scratch) / name
            run_dir.mkdir()
            metrics = pipeline.self_check(gt, cfg, run_dir, new_record(run_dir, cfg, mode="reference-mesh"), quiet=True).metrics
            rows[name] = {key: metrics.get(key) for key in COLUMNS} | {"stage_seconds": metrics["stage_seconds"]}
            if profile:
                profile.disable()
                rows[name]["profile_top_own_time"] = profile_summary(profile)
            print(f"{name:8s} " + " ".join(f"{key}={metrics[key]:.4g}" for key in COLUMNS if metrics.get(key) is not None), flush=True)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "machine": machine(),
        "total_seconds": round(time.monotonic() - started, 1),
        "median_seconds_per_object": statistics.median(row["seconds"] for row in rows.values()),
        "objects": rows,
        "resolved_config": to_dict(cfg),
    }
    out = default_path(f"selfcheck_{Path(args.config).stem}.json", args.results)
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
