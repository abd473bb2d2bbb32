"""Fused CPU kernel of the occupancy grid's ray marching (numba).

:func:`recon.render.occupancy.march_occupied` is the reference: it lays out
every step of every ray as a dense [rays, steps] batch, tests each midpoint
against the grid and keeps the occupied ones. Most steps of most rays are
empty, so on a CPU that batch costs more than the samples it yields. This
kernel walks each ray once to count its occupied steps and once more to write
them, into packed arrays sorted by ray and distance, with the same float32
arithmetic as the reference:

    t_start[k] = t_near + (k + offset) * step,   t_end[k] = t_start[k] + step
    keep step k  iff  t_end[k] <= t_far  and the cell of its midpoint is occupied

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
    from numba import njit, prange

    @njit(inline="always")
    def cell_index(position, radius, resolution):
        """The grid cell along one axis of a world coordinate, or -1 outside the box (as ``occupied``)."""
        unit = (position / radius + np.float32(1.0)) * np.float32(0.5)
        if not (unit >= 0.0 and unit < 1.0):
            return -1
        return np.int64(min(unit, np.float32(1.0 - 1e-6)) * np.float32(resolution))

    @njit(parallel=True, cache=True)
    def march(origins, directions, t_near, t_far, offsets, step, n_steps, binary, radius, first, out_rays, out_starts, write):
        """Count (``write`` False: into ``first``) or write (at ``first[ray]``) each ray's occupied steps."""
        resolution = binary.shape[0]
        for ray in prange(origins.shape[0]):
            found = 0
            for k in range(n_steps):
                t_start = t_near[ray] + (np.float32(k) + offsets[ray]) * step
                t_end = t_start + step
                if t_end > t_far[ray]:
                    break  # t grows with k: every later step is past the box too
                t_mid = np.float32(0.5) * (t_start + t_end)
                ix = cell_index(origins[ray, 0] + directions[ray, 0] * t_mid, radius, resolution)
                iy = cell_index(origins[ray, 1] + directions[ray, 1] * t_mid, radius, resolution)
                iz = cell_index(origins[ray, 2] + directions[ray, 2] * t_mid, radius, resolution)
                if ix >= 0 and iy >= 0 and iz >= 0 and binary[ix, iy, iz]:
                    if write:
                        out_rays[first[ray] + found] = ray
                        out_starts[first[ray] + found] = t_start
                    found += 1
            if not write:
                first[ray] = found

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
