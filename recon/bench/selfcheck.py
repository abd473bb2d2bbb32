"""The self-check over every procedural object: `python -m recon.bench.selfcheck [--config cpu] [key=value ...]`.

Fits each object through the reference prior (no diffusion weights needed),
exports it, scores it, prints a table and writes the figures with a description
of the machine to ``recon/bench/results/selfcheck_<preset>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from recon.bench.metrics import normalize_to_unit_cube
from recon.bench.procedural import OBJECTS
from recon.config import load_config, to_dict
from recon.io_utils import write_json_atomic
from recon.pipeline import choose_device, reconstruct_reference

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("chamfer", "volume_iou", "fscore", "field_psnr", "psnr", "ssim", "faces", "seconds")


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--objects", nargs="*", default=list(OBJECTS))
    parser.add_argument("--results", default=None, help="output JSON (default recon/bench/results/selfcheck_<config>.json)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = choose_device(cfg.device)
    rows = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.objects:
            gt = normalize_to_unit_cube(OBJECTS[name]())[0]
            metrics = reconstruct_reference(gt, cfg, Path(scratch) / name, device=device, quiet=True)
            rows[name] = {key: metrics[key] for key in COLUMNS} | {"stage_seconds": metrics["stage_seconds"]}
            print(f"{name:8s} " + " ".join(f"{key}={metrics[key]:.4g}" for key in COLUMNS), flush=True)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "machine": machine(),
        "total_seconds": round(time.monotonic() - started, 1),
        "objects": rows,
        "resolved_config": to_dict(cfg),
    }
    out = Path(args.results) if args.results else RESULTS / f"selfcheck_{Path(args.config).stem}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
