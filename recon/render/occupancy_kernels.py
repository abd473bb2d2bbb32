"""numba kernel of the occupancy grid's ray marching; see :mod:`recon.render.occupancy_cpu` (importing this needs numba).

Module-level functions, so that numba's on-disk cache finds them again in the
next process instead of compiling anew.
"""

import numpy as np
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
            t_mid = np.float32(0.5) * (t_start + t_end)
            if t_mid >= t_far[ray]:
                break  # t grows with k: every later step is past the box too
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
