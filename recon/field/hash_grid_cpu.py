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

N_INPUT_DIMS = 3  # the grid shape the kernels are written for
N_FEATURES = 2



def _build_kernels():
    """Import (compile, or load from numba's cache) the kernels and run them once on a one-point problem."""
    from recon.field.hash_grid_kernels import encode, encode_backward

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
        (x,) = ctx.saved_tensors
        return None, _table_gradient(x, grad_out, ctx.layout, ctx.n_params), None


class _Reattached(torch.autograd.Function):
    """The features [N, 2 L] of x [N, 3] computed earlier without gradients, joined to the graph: backward as encode's."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, x: torch.Tensor, params: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
        ctx.save_for_backward(x.detach().contiguous())
        ctx.layout, ctx.n_params = layout, params.numel()
        return features.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return None, None, _table_gradient(x, grad_out, ctx.layout, ctx.n_params), None


def _table_gradient(x: torch.Tensor, grad_out: torch.Tensor, layout: LevelLayout, n_params: int) -> torch.Tensor:
    """d loss / d params [n_params] from d loss / d features [N, 2 L] at points x [N, 3]."""
    _, encode_backward = kernels()
    grad_table = torch.zeros(n_params // N_FEATURES, N_FEATURES, dtype=torch.float32)
    accel.match_numba_threads()
    encode_backward(x.numpy(), grad_out.contiguous().float().numpy(), *layout.args(), grad_table.numpy())
    return grad_table.view(-1)


def fused_encode(x: torch.Tensor, params: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
    """The hash-grid encoding of CPU float32 points [N, 3] in [0, 1] -> [N, 2 L], differentiable in ``params``."""
    return _FusedEncoding.apply(x, params, layout)


def reattach(features: torch.Tensor, x: torch.Tensor, params: torch.Tensor, layout: LevelLayout) -> torch.Tensor:
    """``fused_encode(x, params)`` given its value ``features``: no second forward pass, the same gradient."""
    return _Reattached.apply(features, x, params, layout)
