"""The command line: flags -> config -> pipeline, failures -> one line and an exit code.

Exit codes: 0 done, 2 bad input or usage, 3 refused by the safety gate,
4 missing model weights, 130 interrupted (a checkpoint is kept for --resume),
1 an unexpected error (a bug: the traceback goes to error.log in the run dir).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import List, Optional

from recon.config import load_config
from recon.errors import BadInput, ReconError
from recon.io_utils import write_json_atomic
from recon.mesh.data import normalize_to_unit_cube
from recon.mesh.io import load_mesh
from recon.run_record import RunRecord, new_record

EXAMPLES = """examples:
  %(prog)s --image chair.png
  %(prog)s --image chair.png --config cpu --steps 300 --output outputs/chair-quick
  %(prog)s --views --image chair.png --polar 30 --azimuth 90 --samples 4 --output outputs/chair-views
  %(prog)s --doctor                                        # can a default run start here?
  %(prog)s --demo --port 7860                               # the web app (pip install -e ".[demo]")
  %(prog)s --demo --ray-address auto                        # the web app, reconstructions on a Ray cluster
  %(prog)s --image mug.jpg --mask mug-mask.png --elevation 15 fit.lambda_sds=0.05
  %(prog)s --reference-mesh object.obj --config cpu        # self-check, no weights needed
  %(prog)s --export-only outputs/chair-20261125-101500 texture.size=2048 extract.resolution=384
  %(prog)s --resume outputs/chair-20261125-101500
  %(prog)s --benchmark gso --data-root GSO/ --objects list.txt --prior reference --config cpu
  %(prog)s --score other_tool.glb --truth gso/mug/meshes/model.obj --protocol syncdreamer --output scores.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # `python launch.py` in a checkout, `recon` / `python -m recon` when installed
        prog="python launch.py" if Path(sys.argv[0]).name == "launch.py" else "recon",
        description="recon: one photo of an object in, a textured 3D asset (GLB, OBJ) out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--image", metavar="PATH", help="photo of one object (PNG/JPEG/WebP/BMP/TIFF/GIF), e.g. --image chair.png")
    job.add_argument("--reference-mesh", metavar="MESH", help="self-check: reconstruct a known mesh with the reference prior and score it, e.g. --reference-mesh mug.obj")
    job.add_argument("--export-only", metavar="RUN_DIR", help="re-export a finished run from its checkpoint with new export settings, e.g. --export-only outputs/chair-20261125-101500 texture.size=2048")
    job.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint, e.g. --resume outputs/chair-20261125-101500")
    job.add_argument("--benchmark", choices=["gso"], help="run a benchmark over a dataset, e.g. --benchmark gso --data-root GSO/")
    job.add_argument("--score", metavar="PRED_MESH", help="score a mesh against --truth (both in the truth's frame), e.g. --score other_tool.glb --truth gt.obj")
    job.add_argument("--doctor", action="store_true", help="check this machine: GPU, native kernels, weights, disk; exit 0 when a default run can start, 1 with the reasons")
    job.add_argument("--demo", action="store_true", help="start the web app (gradio; the 'demo' extra): upload, safety check, novel views, reconstruction, e.g. --demo --port 7860")
    p.add_argument("--config", metavar="PRESET", help="preset name (zero123, cpu, stable-zero123) or a YAML path; default zero123, e.g. --config cpu")
    p.add_argument("--output", metavar="DIR", help="the run directory itself (must not exist yet); default outputs/<image-stem>-<time>/; for --score, the JSON file to write")
    p.add_argument("--prior", metavar="ID_OR_PATH", help="Zero123 weights: hub id, diffusers folder or .ckpt file ('reference' for benchmarks), e.g. --prior ./zero123-xl")
    gate = p.add_mutually_exclusive_group()
    gate.add_argument("--safety-checker", metavar="ID_OR_PATH", help="safety checker weights: hub id or local folder, e.g. --safety-checker ./safety-checker")
    gate.add_argument("--no-safety-check", action="store_true", help="skip the safety checker (prints a warning; recorded in run.json)")
    p.add_argument("--mask", metavar="PATH", help="foreground mask for --image (white = object), e.g. --mask chair-mask.png")
    p.add_argument("--elevation", type=float, metavar="DEG", help="elevation of the camera that took the photo, degrees, e.g. --elevation 15")
    p.add_argument("--seed", type=int, metavar="N", help="random seed, e.g. --seed 7")
    p.add_argument("--steps", type=int, metavar="N", help="optimisation steps (fit.steps), e.g. --steps 1000")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where to run (default: cuda when available)")
    p.add_argument("--vram", type=float, metavar="GB", help="GPU memory to fit in: each stage's batch size is chosen by the cost model (fit.memory_budget_gb), e.g. --vram 12")
    p.add_argument("--quiet", action="store_true", help="only errors and the final line")
    p.add_argument("--truth", metavar="GT_MESH", help="--score: the true mesh; it is normalised to the unit cube as the protocol says")
    p.add_argument("--protocol", choices=["recon", "syncdreamer"], help="--score and benchmarks: how meshes are scored (eval.protocol; default recon)")
    p.add_argument("--data-root", metavar="DIR", help="benchmark dataset root (one folder or .zip per object)")
    p.add_argument("--objects", metavar="LIST", help="benchmark: file with one object name per line")
    p.add_argument("--ray", action="store_true", help="benchmark and --demo: one object or reconstruction per Ray task on a local Ray cluster started for the run (the 'bench' extra)")
    p.add_argument("--ray-address", metavar="ADDR", help="benchmark and --demo: run on a running Ray cluster (one object or reconstruction per task, a GPU each when it has GPUs), e.g. --ray-address auto")
    p.add_argument("--host", metavar="H", help="--demo: address to listen on (default 127.0.0.1; 0.0.0.0 for every interface), e.g. --host 0.0.0.0")
    p.add_argument("--port", type=int, metavar="P", help="--demo: port to listen on (default 7860), e.g. --port 8080")
    views = p.add_argument_group("novel views (--views --image PATH): Zero123's own images of other views, as its demo draws them")
    views.add_argument("--views", action="store_true", help="write novel views of --image (view_NN.png, 256x256) and run.json instead of an asset, e.g. --views --image chair.png --azimuth 90")
    views.add_argument("--polar", type=float, metavar="DEG", help="change of polar angle, -90..90; positive moves the camera down (default 0), e.g. --polar 30")
    views.add_argument("--azimuth", type=float, metavar="DEG", help="turn around the object, -180..180; positive shows its right side (default 90), e.g. --azimuth -45")
    views.add_argument("--zoom", type=float, metavar="D", help="change of camera distance, -0.5..0.5; positive moves away (default 0), e.g. --zoom 0.2")
    views.add_argument("--samples", type=int, metavar="N", help="how many views to sample, 1..8 (default 4), e.g. --samples 2")
    views.add_argument("--guidance", type=float, metavar="S", help="classifier-free guidance scale, 0..100 (default 3), e.g. --guidance 5")
    views.add_argument("--ddim-steps", type=int, metavar="N", help="DDIM sampling steps, 1..1000 (default 50), e.g. --ddim-steps 75")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. fit.steps=500 texture.size=2048")
    return p


def flag_overrides(args) -> List[str]:
    """Flags are shorthands for config keys; they win over key=value overrides."""
    out = []
    if args.prior is not None:
        if args.prior == "reference":
            out.append("prior.kind=reference")
        else:
            out.append(f"prior.model={args.prior}")
    if args.safety_checker is not None:
        out.append(f"gate.model={args.safety_checker}")
    if args.no_safety_check:
        out.append("gate.enabled=false")
    if args.elevation is not None:
        out.append(f"camera.reference_elevation={args.elevation}")
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if args.steps is not None:
        if args.steps <= 0:
            raise BadInput(f"--steps must be positive, got {args.steps}")
        out.append(f"fit.steps={args.steps}")
    if args.device is not None:
        out.append(f"device={args.device}")
    if args.vram is not None:
        out.append(f"fit.memory_budget_gb={args.vram}")
    if args.protocol is not None:
        out.append(f"eval.protocol={args.protocol}")
    return out


VIEW_FLAGS = ("polar", "azimuth", "zoom", "samples", "guidance", "ddim_steps")


def view_request(args, cfg):
    """The checked novel-view request of ``--views``; the view flags are refused without it."""
    given = [name for name in VIEW_FLAGS if getattr(args, name) is not None]
    if not args.views:
        if given:
            raise BadInput(f"--{given[0].replace('_', '-')} is only for --views (e.g. --views --image chair.png --{given[0].replace('_', '-')} ...)")
        return None
    if not args.image:
        raise BadInput("--views needs --image PATH (the photo to draw novel views of)")
    from recon.views import check_prior_kind, request_from

    check_prior_kind(cfg)
    return request_from(*(getattr(args, name) for name in VIEW_FLAGS), seed=cfg.seed)


def claim_run_dir(output: Optional[str], stem: str) -> Path:
    """Make and claim the run directory: ``--output`` if given, else outputs/<stem>-<time>.

    The claim is the exclusive creation of ``run.json`` (``O_EXCL``), one step
    that exactly one process can win, so two runs never share a directory. A
    given ``--output`` may exist only as an empty folder; an earlier run is
    never overwritten.
    """
    if output:
        path = Path(output)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("outputs") / f"{stem}-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    if path.exists() and not path.is_dir():
        raise BadInput(f"--output {path} is a file; choose a new directory")
    path.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path / "run.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        raise BadInput(f"--output {path} already holds a run; choose a new directory (earlier runs are never overwritten)") from None
    if any(p.name != "run.json" for p in path.iterdir()):
        (path / "run.json").unlink()
        raise BadInput(f"--output {path} already exists and is not empty; choose a new directory (earlier runs are never overwritten)")
    return path


def score_command(args, cfg) -> int:
    """``--score PRED --truth GT``: the protocol's scores of one mesh against another, printed and written."""
    import json

    from recon.eval.score import score_meshes

    if not args.truth:
        raise BadInput("--score needs --truth GT_MESH (the mesh to score against)")
    pred = load_mesh(args.score)
    truth = normalize_to_unit_cube(load_mesh(args.truth))[0]
    scores = {"prediction": str(args.score), "truth": str(args.truth), "protocol": cfg.eval.protocol}
    scores.update(score_meshes(pred, truth, cfg.eval, cfg.eval.protocol, seed=cfg.seed))
    text = json.dumps(scores, indent=2)
    if args.output:
        write_json_atomic(Path(args.output), scores)
    print(text)
    return 0


def make_logger(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log


def _sigterm_as_interrupt(signum, frame):
    # A scheduler's or container's stop request ends the run as Ctrl-C does:
    # checkpoint saved, run.json "interrupted", resume offered.
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = make_logger(args.quiet)
    run_dir: Optional[Path] = None
    record = None
    earlier_record = None  # --resume: the record as it was, put back if the resume fails
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        from recon import pipeline

        if args.export_only or args.resume:
            run_dir = Path(args.export_only or args.resume)
            if not (run_dir / pipeline.CHECKPOINT_NAME).is_file():
                raise BadInput(f"{run_dir} is not a recon run with a checkpoint (no {pipeline.CHECKPOINT_NAME} there)")
            overrides = list(args.overrides) + flag_overrides(args)
            if args.export_only:
                paths = pipeline.export_only(run_dir, overrides, log=log, quiet=args.quiet)
                print(f"exported: {', '.join(str(p) for p in paths.values())}")
                return 0
            loaded = RunRecord.load(run_dir)
            earlier_record = dict(loaded.data)
            result = pipeline.resume(run_dir, overrides, loaded, log=log, quiet=args.quiet)
            print(f"done: {result.paths.get('glb', run_dir)}")
            return 0

        # The self-check's prior is the reference prior unless the command names another.
        defaults = ["prior.kind=reference"] if args.reference_mesh else []
        cfg = load_config(args.config, defaults + list(args.overrides) + flag_overrides(args))
        if args.benchmark:
            from recon.bench.runner import run_benchmark_cli

            return run_benchmark_cli(args, cfg, log)
        if args.score:
            return score_command(args, cfg)
        if args.doctor:
            from recon.doctor import run_doctor

            return run_doctor(cfg, sys.stdout)
        if args.demo:
            from recon.app import serve

            return serve(cfg, host=args.host, port=args.port, ray_address=args.ray_address, use_ray=args.ray)
        request = view_request(args, cfg)
        if request is None:
            from recon.cost_model import fit_to_budget

            cfg = fit_to_budget(cfg, log)  # --vram: before any directory is made
        if args.reference_mesh:
            mesh_path = Path(args.reference_mesh)
            truth = normalize_to_unit_cube(load_mesh(mesh_path))[0]  # validates before anything is written
            run_dir = claim_run_dir(args.output, mesh_path.stem)
            record = new_record(run_dir, cfg, mode="reference-mesh", input=str(mesh_path))
            result = pipeline.self_check(truth, cfg, run_dir, record, log=log, quiet=args.quiet)
            print(f"done: {run_dir} " + " ".join(f"{k}={result.metrics[k]:.4g}" for k in ("chamfer", "volume_iou", "field_psnr", "psnr")))
            return 0

        image_path = Path(args.image)
        pipeline.check_photo_inputs(image_path, args.mask, cfg)  # before any model loads or directory is made
        if request is not None:
            from recon.views import run_novel_views

            run_dir = claim_run_dir(args.output, f"{image_path.stem}-views")
            record = new_record(run_dir, cfg, mode="views", input=str(image_path), mask=args.mask)
            if not cfg.gate.enabled:
                print("warning: the safety checker is disabled (--no-safety-check); this is recorded in run.json", file=sys.stderr)
            views = run_novel_views(image_path, cfg, run_dir, record, request, mask_path=args.mask, log=log)
            withheld = f"; {len(views.withheld)} withheld by the safety checker" if views.withheld else ""
            print(f"done: {run_dir} ({len(views.paths)} views{withheld})")
            return 0
        run_dir = claim_run_dir(args.output, image_path.stem)
        record = new_record(run_dir, cfg, mode="image", input=str(image_path), mask=args.mask)
        if not cfg.gate.enabled:
            print("warning: the safety checker is disabled (--no-safety-check); this is recorded in run.json", file=sys.stderr)
        result = pipeline.reconstruct(image_path, cfg, run_dir, record, mask_path=args.mask, log=log, quiet=args.quiet)
        print(f"done: {result.paths.get('glb', run_dir)}")
        return 0
    except ReconError as error:
        _end_record(record, earlier_record, run_dir, {3: "refused"}.get(error.exit_code, "failed"), str(error))
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        _end_record(record, earlier_record, run_dir, "interrupted", None)
        # only offer a resume that can work: one with a checkpoint to start from
        resumable = run_dir is not None and (Path(run_dir) / "checkpoint.pt").is_file()
        where = f"; resume with: {parser.prog} --resume {run_dir}" if resumable else ""
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    except OSError as error:
        # The filesystem, not recon: read-only, full, missing, name too long.
        if error.errno not in FILESYSTEM_ERRORS:
            return _internal_error(error, record, earlier_record, run_dir)
        message = f"cannot write {error.filename or 'the output'}: {error.strerror or error}"
        _end_record(record, earlier_record, run_dir, "failed", message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: keep the traceback, but out of the user's way
        return _internal_error(error, record, earlier_record, run_dir)


# errno values that mean the filesystem refused (exit 2), not that recon has a bug (exit 1).
FILESYSTEM_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}


def _end_record(record, earlier_record, run_dir, status: str, error: Optional[str]) -> None:
    """Write how the run ended into run.json; a failed --resume puts the earlier record back.

    Best effort: when the disk itself is the problem, the record may not be
    writable either, and the one-line error must still reach the user.
    """
    try:
        if record is not None:
            record.finish(status, **({"error": error} if error else {}))
        elif earlier_record is not None and run_dir is not None:
            if RunRecord.load(run_dir).data == earlier_record:
                return  # refused before it started: the record stays byte for byte
            ended = dict(earlier_record, last_resume={"status": status, "error": error})
            write_json_atomic(Path(run_dir) / "run.json", ended)
    except (OSError, ReconError):
        pass


def _internal_error(error: Exception, record, earlier_record, run_dir) -> int:
    """A bug (exit 1): the traceback goes to error.log in the run directory when there is one."""
    details = traceback.format_exc()
    summary = f"{type(error).__name__}: {error}"
    _end_record(record, earlier_record, run_dir, "failed", summary)
    if run_dir is not None and (record is not None or earlier_record is not None):
        try:
            (Path(run_dir) / "error.log").write_text(details)
            print(f"internal error: {summary} (traceback in {Path(run_dir) / 'error.log'})", file=sys.stderr)
            return 1
        except OSError:
            pass
    print(details, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
