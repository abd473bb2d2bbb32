"""numba kernels of the hash-grid encoding; see :mod:`recon.field.hash_grid_cpu` (importing this needs numba).

Module-level functions, so that numba's on-disk cache finds them again in the
next process instead of compiling anew.
"""

import numpy as np
from numba import njit, prange

# tcnn's primes for axes 1 and 2 (axis 0 uses 1); see recon.field.hash_grid.
_PRIME_Y = 2654435761
_PRIME_Z = 805459861


@njit(inline="always")
def cell_of(x, y, z, scale):
    """Low corner (int64) and fractional position (float32) of a point's cell at one level."""
    px = x * scale + np.float32(0.5)
    py = y * scale + np.float32(0.5)
    pz = z * scale + np.float32(0.5)
    fx, fy, fz = np.floor(px), np.floor(py), np.floor(pz)
    return np.int64(fx), np.int64(fy), np.int64(fz), px - fx, py - fy, pz - fz

@njit(inline="always")
def corner(k, cx, cy, cz, tx, ty, tz, dense, resolution, size, offset):
    """Table row and trilinear weight of corner ``k`` (bit 2: high x, bit 1: high y, bit 0: high z)."""
    hx, hy, hz = (k >> 2) & 1, (k >> 1) & 1, k & 1
    weight = (tx if hx else 1 - tx) * (ty if hy else 1 - ty) * (tz if hz else 1 - tz)
    vx, vy, vz = cx + hx, cy + hy, cz + hz
    if dense:
        return (vx + vy * resolution + vz * resolution * resolution) % size + offset, weight
    # int64 products keep the low 32 bits of tcnn's uint32 ones; the size is a power of two.
    return ((vx ^ (vy * _PRIME_Y) ^ (vz * _PRIME_Z)) & (size - 1)) + offset, weight

@njit(parallel=True, cache=True)
def encode(x, table, scales, resolutions, dense, sizes, offsets, out):
    for i in prange(x.shape[0]):
        for level in range(scales.shape[0]):
            cx, cy, cz, tx, ty, tz = cell_of(x[i, 0], x[i, 1], x[i, 2], scales[level])
            # two features a row (every preset's): accumulate in registers, write once
            sum0 = np.float32(0.0)
            sum1 = np.float32(0.0)
            for k in range(8):
                row, weight = corner(k, cx, cy, cz, tx, ty, tz, dense[level], resolutions[level], sizes[level], offsets[level])
                sum0 += weight * table[row, 0]
                sum1 += weight * table[row, 1]
            out[i, 2 * level] = sum0
            out[i, 2 * level + 1] = sum1

@njit(parallel=True, cache=True)
def encode_backward(x, grad_out, scales, resolutions, dense, sizes, offsets, grad_table):
    for level in prange(scales.shape[0]):
        for i in range(x.shape[0]):
            cx, cy, cz, tx, ty, tz = cell_of(x[i, 0], x[i, 1], x[i, 2], scales[level])
            grad0, grad1 = grad_out[i, 2 * level], grad_out[i, 2 * level + 1]
            for k in range(8):
                row, weight = corner(k, cx, cy, cz, tx, ty, tz, dense[level], resolutions[level], sizes[level], offsets[level])
                grad_table[row, 0] += weight * grad0
                grad_table[row, 1] += weight * grad1
