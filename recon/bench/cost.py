"""What each preset costs on a GPU, worked out on this machine: FLOPs and peak memory per stage and per object.

    python -m recon.bench.cost                         # every preset and the two threestudio recipes
    python -m recon.bench.cost --config lowvram cpu    # some of them
    python -m recon.bench.cost --check-memory          # the memory model against a measured peak

Each fit step is priced by recon.cost_model on fake tensors with the
full-size Zero123-XL architecture (Stable Zero123 has the same modules) in the
dtypes CUDA would use. threestudio's ``zero123`` and ``stable-zero123``
recipes are priced the same way from the settings in their configs
(configs/zero123.yaml, configs/stable-zero123.yaml in threestudio-project/threestudio):
their batch sizes, resolutions, steps and 512 samples per ray, a float32
model (their Zero123 guidance keeps float32 weights) with the score matrix of
attention materialised (the original Zero123 code) and the CLIP model kept
loaded, and analytic normals of every render (their normal losses). Their
extra field evaluations at perturbed points are left out, so their figures
are, if anything, low.

Results go to ``cost.json`` (recon/bench/results in a checkout, or --results)
and the README table is printed with --table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from recon.bench.results import default_path, machine
from recon.config import CONFIG_DIR, Config, load_config
from recon.cost_model import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MARCH_DEPTH,
    PricedFit,
    StepShape,
    fits_card,
    price_refine_step,
    price_step,
    samples_per_ray,
    stage_lengths,
    stage_shapes,
)
from recon.doctor import MODELLED_PEAKS
from recon.io_utils import write_json_atomic
from recon.prior.architectures import FULL, TINY
from recon.render.volume import step_size

PRESETS = ("zero123", "stable-zero123", "lowvram", "cpu")
CARDS_GIB = (8, 12, 16, 24)


@dataclass
class Recipe:
    """Everything the cost of one object depends on."""

    name: str
    source: str
    cfg: Config  # field, render and prior settings the priced fit is built with
    stages: List[Tuple[StepShape, int]]  # (shape of a step, steps spent at it)
    dtype: torch.dtype = torch.float16  # UNet and VAE
    materialised_attention: bool = False
    keep_clip: bool = False  # CLIP (image and text towers) stays loaded
    refine: Optional[Dict[str, int]] = None  # batch, resolution, texture_size, steps
    notes: List[str] = field(default_factory=list)


def preset_recipe(preset: str) -> Recipe:
    cfg = load_config(preset, ["prior.kind=zero123"])
    refine = None
    if cfg.refine.steps:
        refine = {"batch": cfg.refine.batch_size, "resolution": cfg.refine.resolution, "texture_size": cfg.texture.size, "steps": cfg.refine.steps}
    return Recipe(
        name=preset,
        source=f"recon preset {preset}",
        cfg=cfg,
        stages=list(zip(stage_shapes(cfg), stage_lengths(cfg))),
        dtype=torch.float16 if cfg.prior.half_precision else torch.float32,
        refine=refine,
    )


def threestudio_recipes() -> List[Recipe]:
    """threestudio's two Zero123 recipes, from their configs (see the module docstring)."""
    recipes = []
    for name, hidden_layers, steps_per_stage, resolutions, batches, reference_sides in (
        # configs/zero123.yaml: one stage, 2 views of 128 px, the 192 px input view, 10000 steps
        ("threestudio-zero123", 1, [10000], [128], [2], [192]),
        # configs/stable-zero123.yaml: milestones [200, 300] of 600 steps; the input view at 128/256/512 px
        ("threestudio-stable-zero123", 2, [200, 100, 300], [64, 128, 256], [12, 8, 4], [128, 256, 512]),
    ):
        cfg = load_config(
            "zero123",
            ["field.radius=2.0", "field.hidden_dim=64", f"field.n_hidden_layers={hidden_layers}", "render.n_samples_per_ray=512", "prior.half_precision=false"],
        )
        kept = samples_per_ray(step_size(cfg.field.radius, cfg.render))
        stages = [
            (StepShape(batch, resolution, side * side, kept, normals=True, reference_normals=True), steps)
            for steps, resolution, batch, side in zip(steps_per_stage, resolutions, batches, reference_sides)
        ]
        recipes.append(
            Recipe(name=name, source=f"threestudio configs/{name.removeprefix('threestudio-')}.yaml", cfg=cfg, stages=stages,
                   dtype=torch.float32, materialised_attention=True, keep_clip=True)
        )
    return recipes


def _clip_text_tower() -> torch.nn.Module:
    """CLIP ViT-L/14's text tower: threestudio's Zero123 loads the whole CLIP model to embed one image."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768))


def price_recipe(recipe: Recipe, shapes: dict = FULL, log=print) -> dict:
    """Per stage and per object: FLOPs, peak memory, and which cards it fits."""
    started = time.monotonic()
    fit = PricedFit(recipe.cfg, shapes, recipe.dtype, materialised_attention=recipe.materialised_attention, keep_image_encoder=recipe.keep_clip)
    if recipe.keep_clip:
        fit.hold(_clip_text_tower)
    stages = []
    for index, (shape, steps) in enumerate(recipe.stages):
        cost = price_step(fit, shape)
        stages.append({
            "batch": shape.batch, "resolution": shape.resolution, "reference_rays": shape.reference_rays,
            "samples_per_ray": shape.samples_per_ray, "normals": shape.normals, "steps": steps,
            "tflops_per_step": cost.flops / 1e12, "peak_gib": cost.peak_bytes / GIB, "resident_gib": cost.resident_bytes / GIB,
        })
        log(f"  {recipe.name}: stage {index} {shape.batch} x {shape.resolution}^2: {cost.flops / 1e12:.2f} TFLOP/step, peak {cost.peak_bytes / GIB:.2f} GiB")
    refine = None
    if recipe.refine:
        cost = price_refine_step(fit, recipe.refine["batch"], recipe.refine["resolution"], recipe.refine["texture_size"])
        refine = {**recipe.refine, "tflops_per_step": cost.flops / 1e12, "peak_gib": cost.peak_bytes / GIB}
        log(f"  {recipe.name}: refinement {cost.flops / 1e12:.2f} TFLOP/step, peak {cost.peak_bytes / GIB:.2f} GiB")
    peak = max([s["peak_gib"] for s in stages] + ([refine["peak_gib"]] if refine else []))
    peak_on_card = peak + CUDA_CONTEXT_BYTES / GIB
    fit_pflops = sum(s["tflops_per_step"] * s["steps"] for s in stages) / 1e3
    refine_pflops = refine["tflops_per_step"] * refine["steps"] / 1e3 if refine else 0.0
    return {
        "source": recipe.source,
        "unet_dtype": str(recipe.dtype).replace("torch.", ""),
        "steps": sum(steps for _, steps in recipe.stages),
        "stages": stages,
        "refine": refine,
        "peak_gib": peak,
        "peak_with_cuda_context_gib": peak_on_card,
        "fits_gib": {str(card): fits_card(peak * GIB, card) for card in CARDS_GIB},
        "pflops_per_object": fit_pflops + refine_pflops,
        "pflops_refine": refine_pflops,
        "seconds_to_price": round(time.monotonic() - started, 1),
    }


def table(results: dict) -> str:
    """The README's table: one row per recipe."""
    head = "| recipe | steps | peak GiB (with CUDA context) | " + " | ".join(f"fits {c} GB" for c in CARDS_GIB) + " | PFLOP per object |"
    rule = "|" + "---|" * (5 + len(CARDS_GIB) - 1)
    rows = [head, rule]
    for name, r in results["recipes"].items():
        fits = " | ".join("yes" if r["fits_gib"][str(c)] else "no" for c in CARDS_GIB)
        rows.append(f"| {name} | {r['steps']} | {r['peak_with_cuda_context_gib']:.1f} | {fits} | {r['pflops_per_object']:.1f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ checking the memory model

CHECK_SHAPE = StepShape(batch=4, resolution=128, reference_rays=16384, samples_per_ray=24)


def measured_step_bytes(preset: str, shape: StepShape) -> int:
    """The real peak of one step on this CPU, in bytes above what was allocated before it.

    The fit is built for real with the tiny Zero123 in float32; after a
    warm-up step, the next one runs under PyTorch's profiler, whose memory
    events carry the CPU allocator's running total of allocated bytes (the
    CPU's counterpart of ``torch.cuda.max_memory_allocated``; it also sees the
    temporaries kernels allocate inside themselves). Resident memory is no
    measure here: the C library keeps freed heap for reuse, unseen by it.
    """
    from torch.profiler import ProfilerActivity, profile

    fit = PricedFit(load_config(preset, ["prior.image_size=64"]), TINY, torch.float32, fake=False)
    fit.step(shape)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fit.step(shape)
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    # Totals count from the profiler's start; blocks freed that were made before it are not in them.
    return max(e["Total Allocated"] for e in events) - (events[0]["Total Allocated"] - events[0]["Bytes"])


def modelled_step_bytes(preset: str, shape: StepShape) -> int:
    """What the model (fake tensors) says the same step allocates above what is resident."""
    fit = PricedFit(load_config(preset, ["prior.image_size=64"]), TINY, torch.float32)
    cost = price_step(fit, shape)
    return cost.peak_bytes - cost.resident_bytes


def check_memory(preset: str = "cpu", shape: StepShape = CHECK_SHAPE) -> dict:
    """The modelled peak of a step against the measured one; ``ratio`` = modelled / measured."""
    measured = measured_step_bytes(preset, shape)
    modelled = modelled_step_bytes(preset, shape)
    return {"preset": preset, "shape": shape.__dict__, "modelled_gib": modelled / GIB, "measured_gib": measured / GIB, "ratio": modelled / measured}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="*", default=None, help=f"presets to price (default: {' '.join(PRESETS)} and threestudio's two recipes)")
    parser.add_argument("--results", default=None, help="output JSON (default: recon/bench/results/cost.json in a checkout, else ./cost.json)")
    parser.add_argument("--check-memory", action="store_true", help="only compare the memory model with a measured peak on this CPU")
    parser.add_argument("--table", action="store_true", help="also print the README's table")
    args = parser.parse_args(argv)
    if args.check_memory:
        check = check_memory()
        print(f"a step at the {check['preset']} preset with a tiny Zero123: modelled {check['modelled_gib']:.3f} GiB, measured {check['measured_gib']:.3f} GiB (ratio {check['ratio']:.3f})")
        return 0
    recipes = [preset_recipe(p) for p in (args.config or PRESETS)]
    if args.config is None:
        recipes += threestudio_recipes()
    results = {
        "benchmark": "cost",
        "model": "Zero123-XL shapes, fake tensors (recon.cost_model)",
        "assumptions": {
            "march_depth": MARCH_DEPTH,
            "cuda_context_gib": CUDA_CONTEXT_BYTES / GIB,
            "hash_grid": "recon's PyTorch grid (tiny-cuda-nn, when installed, needs less)",
            "flops": "matrix products, convolutions and attention (torch.utils.flop_counter), forward and backward",
        },
        "recipes": {},
        "machine": machine(),
    }
    for recipe in recipes:
        print(f"{recipe.name} ({recipe.source})", flush=True)
        results["recipes"][recipe.name] = price_recipe(recipe)
    results["memory_check"] = check_memory()
    output = default_path("cost.json", args.results)
    write_json_atomic(output, results)
    if args.config is None and args.results is None:
        # What --doctor reads to say which presets fit the GPU it finds.
        peaks = {name: round(r["peak_with_cuda_context_gib"], 2) for name, r in results["recipes"].items() if name in PRESETS and name != "cpu"}
        write_json_atomic(CONFIG_DIR / MODELLED_PEAKS, peaks)
    print(table(results) if args.table else "")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
