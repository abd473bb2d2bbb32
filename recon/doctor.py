"""``launch.py --doctor``: can a default run start on this machine, and if not, why not.

One screen: versions, the GPU and its free memory, the optional native pieces
(and that recon falls back to PyTorch without them), the video encoder for
previews, whether the model weights are on disk (given paths or the Hugging
Face cache), and free disk where outputs go. Exit 0 when a default run can
start; 1 with the reasons when it cannot. Nothing is downloaded or built
beyond the one-time probes a run would make anyway.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from recon import hub
from recon.config import CONFIG_DIR, Config

MODELLED_PEAKS = "modelled_peaks.json"  # beside the presets, written by python -m recon.bench.cost

NOT_READY = 1  # the documented exit status of a doctor that found a blocker


def weights_on_disk(name: str) -> Tuple[bool, str]:
    """Whether the weights ``name`` (a path or a hub id) are here, and where they were looked for."""
    if hub.looks_like_path(name):
        path = Path(name).expanduser()
        return path.exists(), str(path)
    folder = Path(hub.cache_dir()) / f"models--{name.replace('/', '--')}" / "snapshots"
    found = folder.is_dir() and any(folder.iterdir())
    return found, f"Hugging Face cache {hub.cache_dir()}"


def modelled_peaks() -> Dict[str, float]:
    """Each GPU preset's modelled peak in GiB, CUDA context included, as ``python -m recon.bench.cost`` wrote it."""
    path = CONFIG_DIR / MODELLED_PEAKS
    return json.loads(path.read_text()) if path.is_file() else {}


def presets_that_fit(card_bytes: int) -> str:
    """The presets whose modelled peak fits a card of ``card_bytes`` (with the allocator's share, as the cost model rules)."""
    from recon.cost_model import CUDA_CONTEXT_BYTES, GIB, fits_card

    peaks = modelled_peaks()  # the CUDA context included, which fits_card adds itself
    return ", ".join(f"{name} ({peak:.1f} GiB)" for name, peak in sorted(peaks.items(), key=lambda item: item[1])
                     if fits_card(peak * GIB - CUDA_CONTEXT_BYTES, card_bytes / GIB))


def examine(cfg: Config, outputs: Path = Path("outputs")) -> Tuple[List[str], List[str]]:
    """(lines to print, blockers): the machine as a default run with ``cfg`` would find it."""
    import torch

    from recon import accel
    from recon.field.hash_grid import _import_tcnn
    from recon.render.occupancy import use_nerfacc

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"]
    blockers: List[str] = []
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        use_nerfacc("cuda")
        _import_tcnn()
        for name, state in accel.report().items():
            lines.append(f"  {name}: {state}{'' if state == 'ok' else ' (recon falls back to PyTorch)'}")
        lines.append(f"presets that fit this GPU: {presets_that_fit(total) or 'none'}")
    else:
        lines.append("GPU: none visible to PyTorch (only the cpu preset is practical)")
        blockers.append("no CUDA GPU: a default run needs one (use --config cpu for the self-check)")
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        lines.append("video encoder: ffmpeg found (previews as MP4)")
    except Exception:
        lines.append("video encoder: no ffmpeg (previews as GIF)")
    for role, name in (("Zero123 weights", cfg.prior.model), ("safety checker weights", cfg.gate.model)):
        found, where = weights_on_disk(name)
        lines.append(f"{role}: {name}: {'found' if found else 'missing'} ({where})")
        if not found:
            blockers.append(f"{role} missing: {name} (download with {hub.download_command(name)})" if not hub.looks_like_path(name) else f"{role} missing: {name}")
    place = outputs if outputs.exists() else Path(".")
    free_gib = shutil.disk_usage(place).free / 2**30
    lines.append(f"free disk for {outputs}/: {free_gib:.1f} GiB")
    if free_gib < 1.0:
        blockers.append(f"less than 1 GiB free for {outputs}/")
    return lines, blockers


def run_doctor(cfg: Config, stream) -> int:
    """Print the screen to ``stream``; 0 when a default run can start, :data:`NOT_READY` otherwise."""
    lines, blockers = examine(cfg)
    for line in lines:
        print(line, file=stream)
    if blockers:
        print("not ready:", file=stream)
        for reason in blockers:
            print(f"  - {reason}", file=stream)
        return NOT_READY
    print("ready: a default run can start", file=stream)
    return 0
