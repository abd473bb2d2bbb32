"""run.json: what a run was asked, what it used, and how it ended.

Written at the start (status "running") and rewritten atomically whenever
something worth keeping happens, so a crash or Ctrl-C still leaves a readable
record. Status is one of: running, ok, refused, failed, interrupted.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from recon.config import to_dict as cfg_to_dict
from recon.io_utils import write_json_atomic

# Files of a run directory that more than one job reads or writes.
CHECKPOINT_NAME = "checkpoint.pt"
INPUT_IMAGE = "input.png"  # the prepared view the fit sees (every run)
PHOTO_IMAGE = "photo.png"  # the photo a scored run renders of its truth
METRICS_FILE = "metrics.json"

KEY_PACKAGES = ("recon", "torch", "diffusers", "transformers", "nerfacc", "tinycudann", "trimesh", "PyMCubes", "xatlas", "omegaconf", "numpy")


def package_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RunRecord:
    def __init__(self, run_dir: Path, **fields: Any):
        self.path = Path(run_dir) / "run.json"
        self.data: Dict[str, Any] = {
            "status": "running",
            "started": _now(),
            "finished": None,
            "command": sys.argv,
            "versions": package_versions(),
        }
        self.data.update(fields)

    @staticmethod
    def load(run_dir: Path) -> "RunRecord":
        import json

        from recon.errors import BadInput

        record = RunRecord.__new__(RunRecord)
        record.path = Path(run_dir) / "run.json"
        try:
            record.data = json.loads(record.path.read_text())
        except FileNotFoundError:
            raise BadInput(f"{record.path} is missing; this is not a recon run directory") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadInput(f"{record.path} cannot be read ({type(error).__name__}); it is damaged") from None
        if not isinstance(record.data, dict) or "mode" not in record.data:
            raise BadInput(f"{record.path} is not a recon run record")
        return record

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str, **fields: Any) -> None:
        self.data.update(fields, status=status, finished=_now())
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def new_record(run_dir: Path, cfg, mode: str, **fields: Any) -> RunRecord:
    """The record of a new run in ``run_dir`` (which must exist), saved as ``running``."""
    record = RunRecord(
        run_dir,
        mode=mode,
        config=cfg_to_dict(cfg),
        seed=cfg.seed,
        device=cfg.device,
        weights={"prior": cfg.prior.model if cfg.prior.kind == "zero123" else "reference", "safety_checker": cfg.gate.model if cfg.gate.enabled else None},
        **fields,
    )
    record.save()
    return record
