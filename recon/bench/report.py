"""The benchmark's output files: results.csv, results.json, summary.md and scores.png.

Every file is rewritten whole and atomically after each object finishes, so
a reader (or a crash) never sees a half-written report and an interrupted run
still leaves a complete picture of what was scored so far.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from recon.config import EvalConfig
from recon.io_utils import atomic_path, write_bytes_atomic, write_json_atomic

# Columns of results.csv, one row per object.
CSV_COLUMNS = ("object", "status", "chamfer", "volume_iou", "fscore", "psnr", "ssim", "lpips", "seconds", "wall_seconds", "error")
# Scores summarised and plotted, with the direction that is better.
METRICS = {"chamfer": "lower", "volume_iou": "higher", "fscore": "higher", "psnr": "higher", "ssim": "higher", "lpips": "lower"}

# Published image-to-3D results on GSO, measured under SyncDreamer's protocol (eval.protocol=syncdreamer).
PUBLISHED_PROTOCOL = "syncdreamer"
PUBLISHED_SOURCE = "Liu et al., SyncDreamer (ICLR 2024), GSO comparison under its protocol: Chamfer distance / volume IoU"
PUBLISHED = (
    {"method": "Zero123 (SDS)", "chamfer": 0.0339, "volume_iou": 0.5035},
    {"method": "SyncDreamer", "chamfer": 0.0261, "volume_iou": 0.5421},
    {"method": "Magic123", "chamfer": 0.0516, "volume_iou": 0.4528},
)


PROTOCOL_TEXT = {
    "recon": (
        "Protocol `recon`: Chamfer distance (mean of both directions of non-squared nearest-neighbour distances) and "
        "F-score between {n_surface_points} area-weighted surface samples of each mesh; volume IoU of the voxel centres "
        "of a {iou_resolution}^3 grid over [-0.55, 0.55]^3."
    ),
    "syncdreamer": (
        "Protocol `syncdreamer` (SyncDreamer's eval_mesh.py): points back-projected from each mesh's depth maps in the "
        "{n_views} evaluation views, voxel-downsampled at 0.01; Chamfer distance as the mean of both directions' mean "
        "nearest distances; volume IoU of the {iou_resolution}^3 grid points -1 + 2i/{iou_resolution} (mesh2sdf's grid)."
    ),
}


def _number(value) -> Optional[float]:
    """A finite float, or None for missing / NaN / non-numeric values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def summarize(rows: Sequence[dict]) -> Dict[str, dict]:
    """Mean, median and count of each metric over the objects that finished ("ok")."""
    summary = {}
    for metric in METRICS:
        values = sorted(v for v in (_number(row.get(metric)) for row in rows if row.get("status") == "ok") if v is not None)
        if values:
            middle = len(values) // 2
            median = values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])
            summary[metric] = {"mean": sum(values) / len(values), "median": median, "count": len(values)}
        else:
            summary[metric] = {"mean": None, "median": None, "count": 0}
    return summary


def _format(value, digits: int = 4) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def results_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: "" if row.get(column) is None else row.get(column) for column in CSV_COLUMNS})
    return buffer.getvalue()


def summary_markdown(rows: Sequence[dict], run: dict) -> str:
    summary = summarize(rows)
    # The protocol's numbers as this run used them (defaults when the run did not record its config).
    evaluation = {**asdict(EvalConfig()), **(run.get("config") or {}).get("eval", {})}
    ok = [row for row in rows if row.get("status") == "ok"]
    failed = [row for row in rows if row.get("status") != "ok"]
    protocol = run.get("protocol") or evaluation.get("protocol", "recon")
    lines = [
        "# GSO benchmark",
        "",
        f"Prior: `{run.get('prior')}`. Protocol: `{protocol}`. Objects: {len(rows)} ({len(ok)} scored, {len(failed)} failed).",
        f"Wall time of this invocation: {_format(run.get('wall_seconds'), 1)} s; "
        f"sum of per-object wall times: {_format(sum(_number(r.get('wall_seconds')) or 0.0 for r in rows), 1)} s.",
        "",
        PROTOCOL_TEXT[protocol].format(**evaluation),
        f"PSNR / SSIM / LPIPS on {evaluation['n_views']} views at elevation {evaluation['elevation']:g} over white, "
        f"{evaluation['resolution']}x{evaluation['resolution']}. Every object is reconstructed from its photo through",
        "the image path and scored in the truth's frame (the truth normalised to the unit cube).",
        "",
        "| metric | better | mean | median | objects |",
        "|---|---|---|---|---|",
    ]
    for metric, better in METRICS.items():
        entry = summary[metric]
        lines.append(f"| {metric} | {better} | {_format(entry['mean'])} | {_format(entry['median'])} | {entry['count']} |")
    if summary["lpips"]["count"] == 0:
        lines += ["", "LPIPS: n/a (the `lpips` package or its backbone weights are not available locally)."]
    lines += ["", "## Published results for comparison", ""]
    if protocol == PUBLISHED_PROTOCOL:
        lines += [
            f"As reported in {PUBLISHED_SOURCE}. Their object split may differ from this run's.",
            "",
            "| method | Chamfer | volume IoU |",
            "|---|---|---|",
            f"| **recon (this run, mean)** | {_format(summary['chamfer']['mean'])} | {_format(summary['volume_iou']['mean'])} |",
        ]
        lines += [f"| {row['method']} | {row['chamfer']:.4f} | {row['volume_iou']:.4f} |" for row in PUBLISHED]
    else:
        lines.append(
            f"The published rows ({PUBLISHED_SOURCE}) were measured under the `{PUBLISHED_PROTOCOL}` protocol, "
            f"not this run's `{protocol}`, so they are not shown beside it; rerun with `--protocol {PUBLISHED_PROTOCOL}` to compare."
        )
    if failed:
        lines += ["", "## Failed objects", ""]
        # One line each; the full traceback is in the object's folder (error.txt).
        lines += [f"- `{row.get('object')}`: {str(row.get('error') or 'unknown error').splitlines()[0]}" for row in failed]
    return "\n".join(lines) + "\n"


def plot_scores(rows: Sequence[dict], path: Path) -> None:
    """Per-object scores, one panel per metric, published means as dashed lines (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure without pyplot: no global backend state, safe in worker processes.
    names = [str(row.get("object")) for row in rows]
    metrics = [m for m in METRICS if any(_number(row.get(m)) is not None for row in rows)] or ["chamfer"]
    figure = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2.0), 2.2 * len(metrics)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    positions = list(range(len(rows)))
    for axis, metric in zip(axes, metrics):
        values = [_number(row.get(metric)) for row in rows]
        failed = [row.get("status") != "ok" for row in rows]
        axis.bar(positions, [0.0 if v is None else v for v in values], color="tab:blue")
        # Failed objects have no bar: mark them so they do not read as a score of 0.
        failed_positions = [p for p, bad in zip(positions, failed) if bad]
        if failed_positions:  # an empty plot on shared axes upsets the layout
            axis.plot(failed_positions, [0.0] * len(failed_positions), "x", color="tab:red", markersize=9, mew=2, clip_on=False)
        for published, style in zip(PUBLISHED, ("--", "-.", ":")):
            if metric in published:
                axis.axhline(published[metric], linestyle=style, color="0.3", linewidth=1, label=published["method"])
        axis.set_ylabel(f"{metric}\n({METRICS[metric]} is better)", fontsize=8)
        if metric in ("chamfer", "volume_iou"):
            axis.legend(fontsize=7, loc="upper right")
    axes[-1].set_xticks(positions)
    axes[-1].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axes[0].set_title("Per-object scores (red x: failed); lines: published means", fontsize=9)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)


def write_report(output_dir: Path, rows: List[dict], run: dict) -> None:
    """Write results.csv, results.json, summary.md and scores.png for ``rows`` (sorted by object name)."""
    output_dir = Path(output_dir)
    rows = sorted(rows, key=lambda row: str(row.get("object")))
    write_bytes_atomic(output_dir / "results.csv", results_csv(rows).encode("utf-8"))
    write_json_atomic(output_dir / "results.json", {"run": run, "summary": summarize(rows), "published": {"source": PUBLISHED_SOURCE, "rows": list(PUBLISHED)}, "objects": rows})
    write_bytes_atomic(output_dir / "summary.md", summary_markdown(rows, run).encode("utf-8"))
    plot_scores(rows, output_dir / "scores.png")
