"""Where benchmark scripts write their figures, and the description of the machine that measured them.

Figures are only comparable with the machine beside them, so every results
file carries :func:`machine`. Scripts write to the path the user gives; by
default to ``recon/bench/results/<name>`` when run from a checkout (where the
committed figures live) and to ``<name>`` in the current directory otherwise,
never into an installed package.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

CHECKOUT_RESULTS = Path("recon") / "bench" / "results"


def default_path(name: str, given: Optional[str] = None) -> Path:
    """``given`` if set, else ``recon/bench/results/<name>`` under the current directory if it exists, else ``./<name>``."""
    if given:
        return Path(given)
    return CHECKOUT_RESULTS / name if CHECKOUT_RESULTS.is_dir() else Path(name)


def machine() -> dict:
    """The machine and software the figures were measured on (and how busy it was)."""
    import torch

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # other work on the machine slows every timing; this says how busy it was
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info
