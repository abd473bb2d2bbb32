"""Fused CPU kernel of the occupancy grid's ray marching (numba).

:func:`recon.render.occupancy.march_occupied` is the reference: it lays out
every step of every ray as a dense [rays, steps] batch, tests each midpoint
against the grid and keeps the occupied ones. Most steps of most rays are
empty, so on a CPU that batch costs more than the samples it yields. This
kernel walks each ray once to count its occupied steps and once more to write
them, into packed arrays sorted by ray and distance, with the same float32
arithmetic as the reference:

    t_start[k] = t_near + (k + offset) * step,   t_end[k] = t_start[k] + step
    t_mid[k] = (t_start[k] + t_end[k]) / 2
    keep step k  iff  t_mid[k] < t_far  and the cell of t_mid[k] is occupied

Built on first use; where numba cannot build it the reference runs instead
(one notice, :mod:`recon.accel`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from recon import accel

KERNEL_NAME = "numba ray-marching kernel"


def _build_kernel():
    """Import (compile, or load from numba's cache) the kernel and run it once on one ray."""
    from recon.render.occupancy_kernels import march

    # Compile now, on one ray, so that a failure shows here and not mid-fit.
    one = np.zeros((1, 3), np.float32)
    scalar = np.zeros(1, np.float32)
    march(one, one, scalar, scalar, scalar, np.float32(0.1), 1, np.ones((1, 1, 1), np.bool_), np.float32(1.0), np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), False)
    return march


def kernel():
    """The marching kernel, or None where numba cannot build it (probed once, see recon.accel)."""
    return accel.probe(KERNEL_NAME, _build_kernel, "the PyTorch ray marcher")


def march_occupied(
    origins: torch.Tensor,
    directions: torch.Tensor,
    t_near: torch.Tensor,
    t_far: torch.Tensor,
    offsets: torch.Tensor,
    step_size: float,
    n_steps: int,
    binary: torch.Tensor,
    radius: float,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Packed occupied steps (ray_indices [S] int64, t_starts [S], t_ends [S]) of CPU rays [R, 3].

    Same contract as :func:`recon.render.occupancy.march_occupied`; None when
    the kernel is not available (the caller then runs the reference).
    """
    march = kernel()
    if march is None:
        return None
    accel.match_numba_threads()
    arrays = [t.detach().contiguous().float().numpy() for t in (origins, directions, t_near, t_far, offsets)]
    grid = binary.contiguous().numpy()
    step, radius = np.float32(step_size), np.float32(radius)
    counts = np.zeros(origins.shape[0], np.int64)
    march(*arrays, step, n_steps, grid, radius, counts, np.zeros(0, np.int64), np.zeros(0, np.float32), False)
    first = np.cumsum(counts) - counts
    total = int(counts.sum())
    ray_indices, t_starts = np.empty(total, np.int64), np.empty(total, np.float32)
    march(*arrays, step, n_steps, grid, radius, first, ray_indices, t_starts, True)
    t_starts = torch.from_numpy(t_starts)
    return torch.from_numpy(ray_indices), t_starts, t_starts + float(step)
