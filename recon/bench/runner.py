"""Run the reconstruction over GSO objects and score each one, in-process or on a Ray cluster.

    python -m recon.bench.runner DATA_ROOT --output-dir OUT [--objects-file LIST] [--prior reference]
                                 [--config cpu] [--ray | --ray-address ADDR] [key=value ...]

Per object ``<name>``, ``OUT/objects/<name>/`` is the object's run folder: the
run of :func:`recon.pipeline.self_check` (the protocol's photo ``photo.png``,
the prepared ``input.png``, the asset, ``run.json``, ``metrics.json``), the
row ``result.json`` and, after a failure, ``error.txt`` with the traceback.
A zipped object is unpacked into ``OUT/objects/<name>/.unpack/`` only while
it is loaded (see :func:`score_object`).
Every object goes through the image path; the prior (``--prior reference``
or a Zero123 model) is the only difference between modes, and scores are
taken in the truth's frame under ``eval.protocol``.
``OUT/results.csv``, ``results.json``, ``summary.md`` and ``scores.png``
gather all objects (see :mod:`recon.bench.report`) and are rewritten after
every object.

Resuming: an object whose ``result.json`` says ``ok`` is not run again;
failed objects, and objects whose ``result.json`` is unreadable or malformed,
are run again. One object's failure is recorded (status and
message) and the others go on.

With Ray each object is one task (one GPU per task when the cluster has GPUs).
The driver writes every result file itself, so the report is complete on any
cluster; the per-object folders are written by the workers, so on a
multi-machine cluster ``OUT`` should be on a shared filesystem and ``recon``
installed on every machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from recon import cluster
from recon.bench import gso
from recon.bench.report import write_report
from recon.config import Config, load_config, to_dict
from recon.errors import BadInput, ReconError
from recon.io_utils import write_bytes_atomic, write_json_atomic
from recon.mesh.data import MeshData

# The contract of the per-object reconstruction (default: reconstruct_object below):
#   reconstruct(gt_mesh, config, run_dir) -> dict with at least these keys
# (lpips may be None when LPIPS is unavailable) and, ideally, "seconds".
REQUIRED_METRICS = ("chamfer", "volume_iou", "fscore", "psnr", "ssim", "lpips")
Reconstruct = Callable[[MeshData, Config, Path], dict]

RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
UNPACK_DIR = ".unpack"  # inside an object's run folder: where its zip is unpacked while it loads

# Exit code of a benchmark that ran to the end but could not score every
# object (their rows say why); 1 stays reserved for bugs.
SOME_OBJECTS_FAILED = 5


def reconstruct_object(truth: MeshData, config: Config, run_dir: Path) -> dict:
    """One object through the image path (the self-check job, with its own run.json); its metrics."""
    from recon import pipeline
    from recon.run_record import new_record

    record = new_record(run_dir, config, mode="benchmark-object")
    return pipeline.self_check(truth, config, run_dir, record, quiet=True).metrics


def with_prior(config: Config, prior: str) -> Config:
    """``config`` with the benchmark's prior: "reference" (the truth, no weights) or a Zero123 model id or path."""
    config = copy.deepcopy(config)
    if prior == "reference":
        config.prior.kind = "reference"
    else:
        config.prior.kind, config.prior.model = "zero123", str(prior)
    return config


def object_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "objects" / name


def _float_or_none(value) -> Optional[float]:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _failure(name: str, message: str, wall_seconds: Optional[float]) -> dict:
    row = {"object": name, "status": "failed", "error": message, "wall_seconds": wall_seconds}
    row.update({metric: None for metric in REQUIRED_METRICS})
    row["seconds"] = None
    return row


def score_object(
    object_path: Path,
    config: Config,
    run_dir: Path,
    reconstruct: Optional[Reconstruct] = None,
    elevation: float = 30.0,
    max_member_mb: float = gso.MAX_MEMBER_MB,
    max_archive_mb: float = gso.MAX_ARCHIVE_MB,
) -> dict:
    """Load one object, reconstruct it from its photo at ``elevation`` and return its result row; never raises on failure.

    The row has ``object``, ``status`` ("ok" or "failed"), the metrics, the
    reconstruction's own ``seconds``, ``wall_seconds`` (loading and
    reconstruction), ``error`` and ``metrics`` (everything the reconstruction
    returned).

    A zipped object is unpacked under ``max_member_mb`` / ``max_archive_mb``
    (MiB, see :func:`recon.bench.gso.load_gso_object`) into ``run_dir/.unpack``
    rather than the system's temporary folder: the loader empties it before
    unpacking and removes it after loading (also on failure), and the runner
    removes it again when it records the object, so even the leftovers of a
    worker killed while unpacking are in a known place and gone by the end of
    the run (Ray) or the object's next run (in-process); a /tmp folder of a
    killed worker would never be removed.
    """
    name = gso.object_name(object_path)
    run_dir = Path(run_dir)
    started = time.monotonic()
    try:
        reconstruct = reconstruct or reconstruct_object
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a stale traceback from an earlier try would mislead
        gt_mesh = gso.load_gso_object(object_path, unpack_dir=run_dir / UNPACK_DIR, max_member_mb=max_member_mb, max_archive_mb=max_archive_mb)
        # The photo is taken, and the fit's camera placed, at the input's elevation (Zero123 conditions on it).
        config = copy.deepcopy(config)
        config.camera.reference_elevation = elevation
        metrics = reconstruct(gt_mesh, config, run_dir)
        missing = [key for key in REQUIRED_METRICS if key not in metrics]
        if missing:
            raise RuntimeError(f"the reconstruction returned no {', '.join(missing)} (it must return {', '.join(REQUIRED_METRICS)})")
        row = {"object": name, "status": "ok", "error": None}
        row.update({key: _float_or_none(metrics[key]) for key in REQUIRED_METRICS})
        row["seconds"] = _float_or_none(metrics.get("seconds"))
        row["metrics"] = json.loads(json.dumps(metrics, default=str))  # plain JSON values only
    except Exception as error:  # one object's failure must not stop the benchmark
        message = f"{type(error).__name__}: {error}" if not isinstance(error, ReconError) else str(error)
        row = _failure(name, message.strip() or type(error).__name__, None)
        try:
            write_bytes_atomic(run_dir / ERROR_FILE, traceback.format_exc().encode("utf-8"))
        except OSError:
            pass  # the row still carries the message
    row["wall_seconds"] = round(time.monotonic() - started, 3)
    return row


def _previous_result(output_dir: Path, name: str) -> Optional[dict]:
    """The saved row of an object already scored, or None: missing, unreadable, failed or malformed.

    A saved row is reused as is in the report, so one that is not JSON, not
    this object's, or lacks a metric (a hand edit, a file cut short by a full
    disk) counts as missing and the object is scored again, rather than the
    whole run stopping on a KeyError.
    """
    path = object_dir(output_dir, name) / RESULT_FILE
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    if not isinstance(row, dict) or row.get("status") != "ok" or row.get("object") != name:
        return None
    if not all(key in row and _is_metric_value(row[key]) for key in REQUIRED_METRICS):
        return None
    return row


def _is_metric_value(value) -> bool:
    """What score_object writes for a metric: a number, or None when it was not available."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _resolve_objects(data_root: Path, objects: Union[None, str, Path, Sequence[str]]) -> List[Path]:
    if objects is None:
        return gso.list_objects(data_root)
    if isinstance(objects, (str, Path)):
        return gso.list_objects(data_root, objects_file=objects)
    return gso.objects_to_paths(data_root, list(objects))


def _run_in_process(todo: List[Path], run_one, record) -> None:
    for path in todo:
        record(run_one(path))


def _run_on_ray(todo: List[Path], run_one, record, ray_address: Optional[str], log) -> None:
    started_here = cluster.connect(ray_address)
    import ray  # connect() has checked that it is installed

    try:
        task = cluster.remote_task(run_one)
        resources = ray.cluster_resources()
        log(f"ray: {len(todo)} object(s) on {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s)")
        pending = {task.remote(path): (gso.object_name(path), time.monotonic()) for path in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name, submitted = pending.pop(done[0])
            try:
                row = ray.get(done[0])
            except Exception as error:  # the task itself died: score_object never raises
                row = _failure(name, cluster.task_failure(error), round(time.monotonic() - submitted, 3))
            record(row)
    finally:
        if started_here:
            ray.shutdown()


def run_benchmark(
    data_root,
    objects,
    config: Config,
    output_dir,
    prior: str = "reference",
    use_ray: bool = False,
    ray_address: Optional[str] = None,
    reconstruct: Optional[Reconstruct] = None,
    elevation: float = 30.0,
    log: Optional[Callable[[str], None]] = None,
    max_member_mb: float = gso.MAX_MEMBER_MB,
    max_archive_mb: float = gso.MAX_ARCHIVE_MB,
) -> List[dict]:
    """Reconstruct and score GSO objects; returns one row per object (see :func:`score_object`).

    ``objects``: None for every object under ``data_root``, a path to an
    object-list file (one name a line), or a sequence of names. ``prior``
    ("reference", or a Zero123 model id or path) sets the config's prior.
    ``reconstruct`` defaults to :func:`reconstruct_object`. ``use_ray`` or a
    ``ray_address`` runs one Ray task per object. ``max_member_mb`` and
    ``max_archive_mb`` cap the unpacking of zipped objects (MiB; an object
    over them is a failed row, see :func:`score_object`).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data_root, output_dir = Path(data_root), Path(output_dir)
    paths = _resolve_objects(data_root, objects)
    config = with_prior(config, prior)
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = {}
    todo = []
    for path in paths:
        previous = _previous_result(output_dir, gso.object_name(path))
        if previous is not None:
            rows[previous["object"]] = previous
        else:
            todo.append(path)
    skipped = len(rows)
    if skipped:
        log(f"resuming: {skipped} object(s) already scored in {output_dir}, {len(todo)} to run")

    def run_info() -> dict:
        statuses = [row.get("status") for row in rows.values()]
        return {
            "prior": prior,
            "data_root": str(data_root),
            "output_dir": str(output_dir),
            "started": started_at,
            "wall_seconds": round(time.monotonic() - started, 3),
            "objects": len(paths),
            "ok": statuses.count("ok"),
            "failed": len(statuses) - statuses.count("ok"),
            "skipped_already_scored": skipped,
            "ray": bool(use_ray or ray_address),
            "ray_address": ray_address,
            "elevation": elevation,
            "max_member_mb": max_member_mb,
            "max_archive_mb": max_archive_mb,
            "protocol": config.eval.protocol,
            "config": to_dict(config),
        }

    def record(row: dict) -> None:
        rows[row["object"]] = row
        # The object's unpack folder is normally gone already; not when its worker died while unpacking.
        shutil.rmtree(object_dir(output_dir, row["object"]) / UNPACK_DIR, ignore_errors=True)
        write_json_atomic(object_dir(output_dir, row["object"]) / RESULT_FILE, row)
        write_report(output_dir, list(rows.values()), run_info())
        done = len(rows) - skipped
        summary = f"chamfer={row['chamfer']} volume_iou={row['volume_iou']}" if row["status"] == "ok" else row.get("error")
        log(f"[{done}/{len(todo)}] {row['object']}: {row['status']} {summary} ({row.get('wall_seconds')} s)")

    def run_one(path: Path) -> dict:
        run_dir = object_dir(output_dir, gso.object_name(path))
        return score_object(path, config, run_dir, reconstruct, elevation, max_member_mb, max_archive_mb)

    if use_ray or ray_address:
        _run_on_ray(todo, run_one, record, ray_address, log)
    else:
        _run_in_process(todo, run_one, record)
    # Final write: the run's wall time covers everything (also when nothing was left to run).
    write_report(output_dir, list(rows.values()), run_info())
    return [rows[gso.object_name(path)] for path in paths]


def run_benchmark_cli(args, config: Config, log) -> int:
    """``launch.py --benchmark gso``: flags from recon.cli, config already resolved."""
    if not args.data_root:
        raise BadInput("--benchmark gso needs --data-root DIR (one folder or .zip per object)")
    if not Path(args.data_root).is_dir():
        raise BadInput(f"--data-root {args.data_root} is not a directory")
    prior = "reference" if config.prior.kind == "reference" else config.prior.model
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir = Path(args.output) if args.output else Path("outputs") / f"gso-{stamp}"
    elevation = args.elevation if args.elevation is not None else 30.0
    rows = run_benchmark(
        args.data_root, args.objects, config, output_dir, prior=prior, use_ray=args.ray,
        ray_address=args.ray_address, elevation=elevation, log=log,
    )
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} object(s) scored; report in {output_dir / 'summary.md'}")
    return SOME_OBJECTS_FAILED if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon.bench.runner", description="Reconstruct and score Google Scanned Objects (SyncDreamer protocol).")
    parser.add_argument("data_root", help="folder with one GSO object per subfolder or .zip")
    parser.add_argument("--output-dir", required=True, help="where results go; rerun with the same folder to resume")
    parser.add_argument("--objects-file", help="text file, one object name a line (default: every object)")
    parser.add_argument("--prior", default="reference", help="'reference' (ground-truth mesh) or a Zero123 model id / path")
    parser.add_argument("--config", default=None, help="config preset name or YAML path")
    parser.add_argument("--elevation", type=float, default=30.0, help="elevation of the input view, degrees")
    parser.add_argument("--ray", action="store_true", help="run one Ray task per object on a local Ray instance")
    parser.add_argument("--ray-address", default=None, help="address of a running Ray cluster (implies --ray)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        rows = run_benchmark(
            args.data_root,
            args.objects_file,
            config,
            args.output_dir,
            prior=args.prior,
            use_ray=args.ray,
            ray_address=args.ray_address,
            elevation=args.elevation,
        )
    except ReconError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} object(s) scored; report in {Path(args.output_dir) / 'summary.md'}", file=sys.stderr)
    return SOME_OBJECTS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
