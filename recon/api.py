"""The Python API: ``from recon import reconstruct, novel_views``.

Each function takes the command line's arguments as keywords (``config`` is
``--config``, ``no_safety_check`` is ``--no-safety-check``, ``overrides`` the
``key=value`` list) and makes a run exactly as the command does: inputs checked
before anything loads, the run directory claimed, ``run.json`` saying how the
run ended. Failures raise the command's errors (:class:`~recon.errors.BadInput`,
:class:`~recon.errors.Refused`, :class:`~recon.errors.MissingWeights`, each with
its ``exit_code``) after the record is finished. The web app uses this API.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

from recon.errors import ReconError

# progress(stage, step, total, seconds): the stage's name, the fit's step and
# step count (0, 0 outside the fit) and the seconds since the run started.
ProgressCallback = Callable[[str, int, int, float], None]


@dataclass
class Result:
    """What a run wrote: its directory, the files by kind, and its run.json as a dict."""

    run_dir: Path
    paths: Dict[str, Path]
    record: dict
    withheld: List[int] = field(default_factory=list)  # novel views the safety checker flagged


def config_for(
    config=None,
    overrides: Sequence[str] = (),
    *,
    prior: Optional[str] = None,
    safety_checker: Optional[str] = None,
    no_safety_check: bool = False,
    elevation: Optional[float] = None,
    seed: Optional[int] = None,
    steps: Optional[int] = None,
    device: Optional[str] = None,
):
    """The resolved config, the flags turned into overrides exactly as the command line does.

    ``config``: a preset name or YAML path (``--config``), or an already resolved
    :class:`~recon.config.Config` (the app's) that the overrides then apply to.
    """
    from recon.cli import flag_overrides
    from recon.config import Config, apply_overrides, load_config

    if safety_checker is not None and no_safety_check:
        raise _bad_input("safety_checker and no_safety_check exclude each other")
    flags = SimpleNamespace(
        prior=prior, safety_checker=safety_checker, no_safety_check=no_safety_check, elevation=elevation,
        seed=seed, steps=steps, device=device, protocol=None, vram=None,
    )
    if isinstance(config, Config):
        return apply_overrides(config, list(overrides) + flag_overrides(flags))
    return load_config(config, list(overrides) + flag_overrides(flags))


def reconstruct(
    image,
    *,
    config=None,
    output=None,
    prior: Optional[str] = None,
    safety_checker: Optional[str] = None,
    no_safety_check: bool = False,
    mask=None,
    elevation: Optional[float] = None,
    seed: Optional[int] = None,
    steps: Optional[int] = None,
    device: Optional[str] = None,
    quiet: bool = True,
    overrides: Sequence[str] = (),
    progress: Optional[ProgressCallback] = None,
    check_outputs: bool = False,
) -> Result:
    """``--image``: photo -> textured asset. Returns the run directory, the asset files and run.json.

    ``check_outputs``: the finished asset's turntable frames pass the safety
    checker before any file is written; a flagged asset is withheld (Refused).
    """
    from recon import pipeline
    from recon.cli import claim_run_dir
    from recon.cost_model import fit_to_budget
    from recon.run_record import new_record

    cfg = config_for(config, overrides, prior=prior, safety_checker=safety_checker, no_safety_check=no_safety_check,
                     elevation=elevation, seed=seed, steps=steps, device=device)
    image_path = Path(image)
    pipeline.check_photo_inputs(image_path, None if mask is None else str(mask), cfg)
    cfg = fit_to_budget(cfg)
    run_dir = claim_run_dir(None if output is None else str(output), image_path.stem)
    record = new_record(run_dir, cfg, mode="image", input=str(image_path), mask=None if mask is None else str(mask))
    started = time.monotonic()
    with _finished_on_error(record, run_dir), _reporting(progress, started) as log:
        result = pipeline.reconstruct(image_path, cfg, run_dir, record, mask_path=None if mask is None else str(mask), log=log, quiet=quiet,
                                      check_outputs=check_outputs)
    return Result(run_dir, dict(result.paths), dict(record.data))


def novel_views(
    image,
    *,
    polar: Optional[float] = None,
    azimuth: Optional[float] = None,
    zoom: Optional[float] = None,
    samples: Optional[int] = None,
    guidance: Optional[float] = None,
    ddim_steps: Optional[int] = None,
    config=None,
    output=None,
    prior: Optional[str] = None,
    safety_checker: Optional[str] = None,
    no_safety_check: bool = False,
    mask=None,
    elevation: Optional[float] = None,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    overrides: Sequence[str] = (),
    gate=None,
) -> Result:
    """``--views``: Zero123's images of the object from (polar, azimuth, zoom) relative to the photo.

    ``gate``: an already loaded safety checker to reuse (the app's); by default
    the one the config names is loaded for the run.
    """
    from recon import pipeline
    from recon.cli import claim_run_dir
    from recon.run_record import new_record
    from recon.views import check_prior_kind, request_from, run_novel_views

    cfg = config_for(config, overrides, prior=prior, safety_checker=safety_checker, no_safety_check=no_safety_check,
                     elevation=elevation, seed=seed, device=device)
    request = request_from(polar, azimuth, zoom, samples, guidance, ddim_steps, cfg.seed)
    check_prior_kind(cfg)
    image_path = Path(image)
    pipeline.check_photo_inputs(image_path, None if mask is None else str(mask), cfg)
    run_dir = claim_run_dir(None if output is None else str(output), f"{image_path.stem}-views")
    record = new_record(run_dir, cfg, mode="views", input=str(image_path), mask=None if mask is None else str(mask))
    with _finished_on_error(record, run_dir):
        views = run_novel_views(image_path, cfg, run_dir, record, request, mask_path=None if mask is None else str(mask), gate=gate)
    paths = {f"view_{i}": p for i, p in enumerate(views.paths)}
    paths["input"] = views.input_path
    return Result(run_dir, paths, dict(record.data), views.withheld)


# ----------------------------------------------------------------------------- helpers


def _bad_input(message: str):
    from recon.errors import BadInput

    return BadInput(message)


@contextmanager
def _finished_on_error(record, run_dir: Path):
    """End run.json as the command line does when the run raises, then let the error through."""
    from recon.cli import _end_record

    try:
        yield
    except ReconError as error:
        _end_record(record, None, run_dir, {3: "refused"}.get(error.exit_code, "failed"), str(error))
        raise
    except KeyboardInterrupt:
        _end_record(record, None, run_dir, "interrupted", None)
        raise
    except BaseException as error:
        import traceback

        _end_record(record, None, run_dir, "failed", f"{type(error).__name__}: {error}")
        try:
            (Path(run_dir) / "error.log").write_text(traceback.format_exc())
        except OSError:
            pass
        raise


@contextmanager
def _reporting(progress: Optional[ProgressCallback], started: float):
    """A ``log`` for the pipeline that reports stages, with the steps of each bar reported too."""
    if progress is None:
        yield None
        return
    from recon.progress import listening

    stage = {"name": "start"}

    def log(message: str) -> None:
        if message.startswith("[") and message.endswith("]"):
            stage["name"] = message[1:-1]
            progress(stage["name"], 0, 0, time.monotonic() - started)

    def on_step(description: str, count: int, total: int) -> None:
        progress(stage["name"], count, total, time.monotonic() - started)

    with listening(on_step):
        yield log
