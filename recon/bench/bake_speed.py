"""How long texturing takes: xatlas unwrap, then baking a 1024x1024 texture.

    python -m recon.bench.bake_speed                 # ~50k faces, 1024 texels, writes bake_speed.json (recon/bench/results in a checkout)
    python -m recon.bench.bake_speed --size 2048     # other texture sizes / mesh resolutions

The mesh is marching cubes of a bumpy blob (an SDF, so nothing binary is
stored) at a grid resolution that gives about 50k faces, like the meshes that
the extract stage hands over. The albedo function is a cheap formula, so the
"albedo queries" time is the chunking overhead; with the real field add the
field's own cost. Each bake stage is timed on its own, then the whole
``bake_texture`` call (not counting the unwrap, which is timed separately).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from recon.bench.results import default_path, machine
from recon.io_utils import write_json_atomic
from recon.mesh.data import MeshData
from recon.mesh.texture import bake_texture, fill_seams, query_albedo, texel_points, unwrap


def bumpy_blob(grid: int) -> MeshData:
    """Marching cubes of a sphere with sinusoidal bumps, inside [-1, 1]^3."""
    import mcubes

    axis = np.linspace(-1.0, 1.0, grid)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    sdf = np.sqrt(x**2 + y**2 + z**2) - 0.6 - 0.08 * np.sin(6 * x) * np.sin(6 * y) * np.sin(6 * z)
    vertices, faces = mcubes.marching_cubes(-sdf, 0.0)
    vertices = vertices / (grid - 1) * 2.0 - 1.0
    return MeshData(torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces.astype(np.int64)))


def analytic_albedo(points: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * torch.sin(5.0 * points + torch.tensor([0.0, 2.0, 4.0]))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=125, help="marching cubes grid (125 gives ~52k faces)")
    parser.add_argument("--size", type=int, default=1024, help="texture size in texels")
    parser.add_argument("--padding", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="bake runs; the fastest is reported")
    parser.add_argument("--output", default=None, help="results file (default: recon/bench/results/bake_speed.json in a checkout, else ./bake_speed.json)")
    parser.add_argument("--field-config", default="cpu", help="preset whose field the product bake queries (cost per query)")
    args = parser.parse_args(argv)

    mesh = bumpy_blob(args.grid)
    print(f"mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces; texture {args.size}x{args.size}")
    unwrapped, unwrap_s = timed(unwrap, mesh, size=args.size, padding=args.padding)
    print(f"unwrap (xatlas)     {unwrap_s:7.2f} s")

    from recon.config import load_config
    from recon.field.field import RadianceField
    from recon.render.field_views import surface_colour

    field_cfg = load_config(args.field_config)
    field = RadianceField(field_cfg.field)

    def field_colour(points, normals):
        return surface_colour(field, points, normals, field_cfg.texture.bake_depth)

    stages = {"uv_rasterize_s": [], "albedo_query_s": [], "seam_fill_s": [], "bake_total_s": [], "bake_with_field_s": []}
    for _ in range(args.repeats):
        (mask, points), seconds = timed(texel_points, unwrapped, args.size)
        stages["uv_rasterize_s"].append(seconds)
        colors, seconds = timed(query_albedo, analytic_albedo, points)
        stages["albedo_query_s"].append(seconds)
        texture = torch.zeros(args.size, args.size, 3)
        texture[mask] = colors
        _, seconds = timed(fill_seams, texture, mask)
        stages["seam_fill_s"].append(seconds)
        _, seconds = timed(bake_texture, unwrapped, analytic_albedo, size=args.size, padding=args.padding)
        stages["bake_total_s"].append(seconds)
        # The product's bake: the field composited along each texel's normal
        # (recon.render.field_views.surface_colour), 16 field queries per texel. An
        # untrained field costs the same per query as a fitted one.
        _, seconds = timed(bake_texture, unwrapped, field_colour, size=args.size, padding=args.padding, normals=True)
        stages["bake_with_field_s"].append(seconds)
    best = {name: min(values) for name, values in stages.items()}
    for name, value in best.items():
        print(f"{name[:-2].replace('_', ' '):19s} {value:7.2f} s")
    coverage = float(mask.float().mean())
    print(f"texels covered by charts: {coverage:.1%}")

    result = {
        "benchmark": "bake_speed",
        "machine": machine(),
        "mesh": {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "uv_vertices": len(unwrapped.uvs)},
        "texture_size": args.size,
        "padding": args.padding,
        "texel_coverage": coverage,
        "unwrap_s": unwrap_s,
        **best,
        "runs": stages,
        "field_config": args.field_config,
        "target": "bake under 15 s on a 2-core CPU (unwrap not counted): bake_with_field_s is the product's bake",
    }
    output = default_path("bake_speed.json", args.output)
    write_json_atomic(output, result)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
