"""Optional accelerators, probed once per process and never fatal.

recon runs everywhere on plain PyTorch. Where an optional native piece can
run (numba's CPU kernels, tiny-cuda-nn and nerfacc's CUDA kernels on a GPU),
the same function runs faster. Each piece is built or imported the first time
it is asked for; if that fails, recon says so in one line (once) and keeps
using the PyTorch implementation. ``report()`` lists what was probed, for
``--doctor`` and ``run.json``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, TypeVar

from recon.errors import one_line

log = logging.getLogger("recon")

T = TypeVar("T")

_BUILT: Dict[str, object] = {}
_FAILED: Dict[str, str] = {}
_NOTICES: set = set()


def notice(message: str) -> None:
    """A one-line warning, shown once per process however often it is raised."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        log.warning(message)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when there is no message)."""
    return f"{type(error).__name__}: {one_line(error)}" if str(error).strip() else type(error).__name__


def probe(name: str, build: Callable[[], T], fallback: str) -> Optional[T]:
    """``build()``'s result, built once; None (and a notice naming ``fallback``) when it fails.

    ``name`` identifies the piece ("numba hash-grid kernels"); ``fallback``
    says what runs instead ("the PyTorch hash grid").
    """
    if name in _BUILT:
        return _BUILT[name]  # type: ignore[return-value]
    if name in _FAILED:
        return None
    try:
        built = build()
    except ImportError as error:
        _FAILED[name] = f"not installed ({first_line(error)})"
    except Exception as error:  # native builds fail with every kind of exception
        _FAILED[name] = f"failed to build ({first_line(error)})"
    else:
        _BUILT[name] = built
        return built
    notice(f"{name}: {_FAILED[name]}; using {fallback} instead (same results, slower)")
    return None


def report() -> Dict[str, str]:
    """What was probed so far: name -> "ok" or the reason it is not used."""
    return {**{name: "ok" for name in _BUILT}, **_FAILED}


def forget(name: str) -> None:
    """Probe ``name`` again next time (tests that simulate a failure)."""
    _BUILT.pop(name, None)
    _FAILED.pop(name, None)
    _NOTICES.difference_update({message for message in _NOTICES if message.startswith(f"{name}:")})


def match_numba_threads() -> None:
    """Give numba's kernels as many threads as PyTorch uses (Ray workers and tests limit torch's)."""
    import numba
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
