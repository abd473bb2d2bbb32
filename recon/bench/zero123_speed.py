"""How long one Zero123 SDS step takes at each resolution stage of a preset.

    python -m recon.bench.zero123_speed            # CUDA GPU: full-size model, writes zero123_speed.json (recon/bench/results in a checkout)
    python -m recon.bench.zero123_speed --tiny     # any machine: a tiny model, a smoke test of this script

The model is randomly initialised with Zero123-XL's shapes (Stable Diffusion 1.x
UNet with 8 input channels and 768-wide cross-attention, CLIP ViT-L/14 vision
tower, the SD VAE), so no weights are needed and the timings are those of the
real architecture. A step is what the fit loop asks of the prior: VAE-encode
the renders, one guided UNet call on [unconditional; conditional], the SDS
surrogate loss and its backward pass into the renders. Rendering the NeRF is
not included. Batch sizes, resolutions and stage lengths come from the preset.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch

from recon.bench.results import default_path, machine
from recon.camera import Cameras
from recon.config import Config, load_config
from recon.io_utils import write_json_atomic
from recon.prepare import ReferenceView
from recon.prior.zero123 import Zero123Prior
from recon.prior.architectures import FULL, TINY, random_components

def stage_lengths(cfg: Config) -> List[int]:
    """Fit steps spent in each coarse-to-fine stage."""
    bounds = list(cfg.camera.milestones) + [cfg.fit.steps]
    return [max(0, min(bounds[i + 1], cfg.fit.steps) - min(bounds[i], cfg.fit.steps)) for i in range(len(cfg.camera.milestones))]


def time_stage(prior: Zero123Prior, batch: int, resolution: int, steps: int, warmup: int, device: torch.device) -> Dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, resolution, resolution, 3, generator=generator).to(device).requires_grad_(True)
    cameras = Cameras.make(
        torch.rand(batch, generator=generator) * 70 - 10, torch.rand(batch, generator=generator) * 360 - 180, prior.cond_distance, 40.0, device=device
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for index in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = prior.sds_loss(images, cameras, step=index)
        out["loss_sds"].backward()
        images.grad = None
        if cuda:
            torch.cuda.synchronize(device)
        if index >= warmup:
            timings.append(time.perf_counter() - start)
    timings.sort()
    return {
        "batch": batch,
        "resolution": resolution,
        "ms_per_step": 1000.0 * sum(timings) / len(timings),
        "ms_per_step_median": 1000.0 * timings[len(timings) // 2],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="zero123", help="config preset whose stages are timed")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per stage (allocator, cuDNN autotune)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on any device: checks this script runs")
    parser.add_argument("--fp32", action="store_true", help="keep the UNet in float32 on CUDA")
    parser.add_argument("--output", default=None, help="results file (default on CUDA: recon/bench/results/zero123_speed.json in a checkout, else ./zero123_speed.json)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("zero123_speed times the full-size model and needs a CUDA GPU, and none is visible here.")
        print("Run it on a GPU machine, or add --tiny for a quick CPU smoke test of the script.")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(args.preset)
    cfg.prior.half_precision = not args.fp32
    if args.tiny:
        cfg.prior.image_size = 64
        cfg.camera.resolutions = [min(r, 64) for r in cfg.camera.resolutions]
        cfg.camera.batch_sizes = [min(b, 2) for b in cfg.camera.batch_sizes]

    reference = ReferenceView(torch.rand(cfg.prior.image_size, cfg.prior.image_size, 4, generator=torch.Generator().manual_seed(0)))
    reference_camera = Cameras.make(cfg.camera.reference_elevation, 0.0, cfg.camera.distance, cfg.camera.fovy, device=device)
    build_start = time.perf_counter()
    components = random_components(TINY if args.tiny else FULL, device)
    prior = Zero123Prior(cfg.prior, reference, reference_camera, device, components=components)
    print(f"model: {'tiny' if args.tiny else 'Zero123-XL shapes'}, random init, {prior.dtype} UNet on {device} "
          f"(built in {time.perf_counter() - build_start:.1f} s)")

    stages = []
    for batch, resolution, length in zip(cfg.camera.batch_sizes, cfg.camera.resolutions, stage_lengths(cfg)):
        result = time_stage(prior, batch, resolution, args.steps, args.warmup, device)
        result["steps_in_run"] = length
        stages.append(result)
        memory = f", peak {result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else ""
        print(f"  {batch:3d} x {resolution:3d}^2: {result['ms_per_step']:8.1f} ms/step (median {result['ms_per_step_median']:.1f}){memory}")
    total = sum(s["ms_per_step"] * s["steps_in_run"] for s in stages) / 1000.0
    peaks = [s["peak_memory_gib"] for s in stages if s["peak_memory_gib"] is not None]
    print(f"estimated SDS time for the {cfg.fit.steps}-step '{args.preset}' run: {total:.1f} s (prior only, renders excluded)")
    if peaks:
        print(f"peak GPU memory: {max(peaks):.2f} GiB")

    import diffusers
    import transformers

    output = default_path("zero123_speed.json", args.output) if (args.output or (cuda and not args.tiny)) else None
    if output is not None:
        write_json_atomic(
            output,
            {
                "benchmark": "zero123_speed",
                "model": "tiny" if args.tiny else "Zero123-XL shapes, random init",
                "preset": args.preset,
                "unet_dtype": str(prior.dtype).replace("torch.", ""),
                "steps_timed_per_stage": args.steps,
                "warmup_steps": args.warmup,
                "stages": stages,
                "estimated_sds_seconds": total,
                "peak_memory_gib": max(peaks) if peaks else None,
                "machine": {**machine(), "device": str(device), "diffusers": diffusers.__version__, "transformers": transformers.__version__},
            },
        )
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
