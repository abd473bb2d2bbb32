"""Fused CPU kernels of the hash-grid encoding (numba), behind an autograd function.

The pure-PyTorch :class:`recon.field.hash_grid.HashGrid` is the reference: it
builds an int64 index tensor [levels, corners, points] and gathers from it, so
on a CPU most of its time goes to writing and reading those temporaries. These
kernels compute the same function one point at a time, with no temporaries:

* ``encode``: for point ``i`` and level ``l``, the eight corners of its cell,
  their table rows (dense or hashed, exactly as ``HashGrid.corner_indices``)
  and the trilinear weights; ``out[i, 2 l + f] = sum_k w_k * table[row_k, f]``.
  Parallel over points.
* ``encode_backward``: the table gradient, ``grad_table[row_k, f] += w_k *
  grad_out[i, 2 l + f]``. Parallel over levels: every level owns a disjoint
  slice of the table, so no two threads ever add to one row.

They are written for three input dimensions and two features per level (every
preset's grid). Only the table gets a gradient: callers that need the gradient
with respect to the points (normals from the density's gradient) use the
PyTorch path, which ``HashGrid.forward`` picks by itself when its input
requires grad, as it does for any other grid shape.

numba is optional at run time: :func:`kernels` builds them on first use, and
a failure is reported once (one line, :mod:`recon.accel`) before everything
falls back to PyTorch.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from recon import accel

# tcnn's primes for axes 1 and 2 (axis 0 uses 1); see recon.field.hash_grid.
_PRIME_Y = 2654435761
_PRIME_Z = 805459861

N_INPUT_DIMS = 3  # the grid shape the kernels are written for
N_FEATURES = 2



def _build_kernels():
    """Compile the two kernels (cached on disk by numba after the first process)."""
    from numba import njit, prange

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

    # Compile now, on a one-point problem, so that a failure shows here and not mid-fit.
    x = np.zeros((1, 3), np.float32)
    layout = (np.ones(1, np.float32), np.full(1, 2, np.int64), np.ones(1, np.bool_), np.full(1, 8, np.int64), np.zeros(1, np.int64))
    encode(x, np.zeros((8, 2), np.float32), *layout, np.zeros((1, 2), np.float32))
    encode_backward(x, np.zeros((1, 2), np.float32), *layout, np.zeros((8, 2), np.float32))
    return encode, encode_backward


KERNELS_NAME = "numba hash-grid kernels"


def kernels() -> Optional[tuple]:
    """(encode, encode_backward), or None where numba cannot build them (probed once, see recon.accel)."""
    return accel.probe(KERNELS_NAME, _build_kernels, "the PyTorch hash grid")


class LevelLayout:
    """The per-level constants the kernels read, as numpy arrays (taken from a HashGrid once)."""

    def __init__(self, grid) -> None:
        self.scales = grid.scales.detach().cpu().numpy().astype(np.float32)
        self.resolutions = np.asarray(grid.resolutions, dtype=np.int64)
        self.dense = np.asarray(grid.level_is_dense, dtype=np.bool_)
        self.sizes = np.asarray(grid.level_sizes, dtype=np.int64)
        self.offsets = np.asarray(grid.level_offsets, dtype=np.int64)

    def args(self) -> tuple:
        return self.scales, self.resolutions, self.dense, self.sizes, self.offsets


class _FusedEncoding(torch.autograd.Function):
    """out [N, 2 L] = encode(x [N, 3], params); backward gives the table's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, params: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        encode, _ = kernels()
        x = x.detach().contiguous()
        table = params.detach().view(-1, N_FEATURES)
        out = torch.empty(x.shape[0], layout.scales.shape[0] * N_FEATURES, dtype=torch.float32)
        accel.match_numba_threads()
        encode(x.numpy(), table.numpy(), *layout.args(), out.numpy())
        ctx.save_for_backward(x)
        ctx.layout, ctx.n_params = layout, params.numel()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        _, encode_backward = kernels()
        (x,) = ctx.saved_tensors
        grad_table = torch.zeros(ctx.n_params // N_FEATURES, N_FEATURES, dtype=torch.float32)
        accel.match_numba_threads()
        encode_backward(x.numpy(), grad_out.contiguous().float().numpy(), *ctx.layout.args(), grad_table.numpy())
        return None, grad_table.view(-1), None


def fused_encode(x: torch.Tensor, params: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
    """The hash-grid encoding of CPU float32 points [N, 3] in [0, 1] -> [N, 2 L], differentiable in ``params``."""
    return _FusedEncoding.apply(x, params, layout)
