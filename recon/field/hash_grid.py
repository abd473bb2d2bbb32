"""Multiresolution hash encoding (Mueller et al. 2022) in pure PyTorch, and a factory for tiny-cuda-nn's.

The grid follows tiny-cuda-nn's conventions exactly, so that one config means
one grid whichever implementation runs it:

* level ``l`` has ``scale = base_resolution * per_level_scale**l - 1`` (float32
  maths, as tcnn computes it) and ``resolution = ceil(scale) + 1`` vertices a side;
* a point ``x`` in [0, 1] sits at ``x * scale + 0.5`` in grid units: the half-cell
  offset staggers the levels so their vertices never line up;
* a level whose dense grid fits its table (``resolution**d <= 2**log2_hashmap_size``)
  is indexed densely (``x + y * res + z * res**2``, modulo the level's table size,
  which wraps the last vertex of a row the way tcnn does); finer levels are
  hashed: xor of the coordinates times the primes (1, 2654435761, 805459861),
  in uint32 arithmetic, modulo the table size;
* each level's table holds ``min(next_multiple(resolution**d, 8), 2**log2_hashmap_size)``
  entries of ``n_features_per_level`` values; all levels live in one flat
  parameter ``params`` at per-level offsets, in tcnn's layout and under tcnn's
  name, initialised uniform(-1e-4, 1e-4).

The pure PyTorch path works on every device and is what runs on CPU. It is
vectorised over levels, points and the 2**d corners of each cell: one int64
index tensor [levels, corners, points] and one gather from the table. Levels
come first so that consecutive lookups stay inside one level's slice of the
table (better cache and TLB locality than interleaving all levels per point).
Peak memory is about ``n_levels * 2**d * 24`` bytes per point for a forward
pass without grad (3 KB for the default 16 levels) and ``* 42`` bytes with the
backward pass, so callers chunk large batches (marching cubes, baking).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.utils.checkpoint
import torch.nn as nn

from recon.config import FieldConfig
from recon.errors import BadInput
from recon.field import hash_grid_cpu

log = logging.getLogger(__name__)

# tcnn's "CoherentPrime" hash: 1 for the first axis keeps the two x-neighbours
# of a cell next to each other in the table, which is kinder to the cache.
_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)


def _combine_corners(per_axis: torch.Tensor, op, out: torch.Tensor) -> torch.Tensor:
    """Table indices per axis [L, d, 2, N] (low and high vertex) -> per corner, into ``out`` [L, 2**d, N].

    Corner ``k`` takes the high vertex along axis ``a`` when bit ``d - 1 - a`` of
    ``k`` is set (axis 0 is the most significant bit); the interpolation in
    :meth:`HashGrid.forward` walks the corners in the same order. The last round
    writes straight into ``out``, which spares the largest temporary.
    """
    n_axes = per_axis.shape[1]
    if n_axes == 1:
        return out.copy_(per_axis[:, 0])
    combined = per_axis[:, 0]
    for axis in range(1, n_axes - 1):
        combined = op(combined.unsqueeze(2), per_axis[:, axis].unsqueeze(1)).flatten(1, 2)
    op(combined.unsqueeze(2), per_axis[:, -1].unsqueeze(1), out=out.unflatten(1, (-1, 2)))
    return out


RECOMPUTE_CHUNK = 2**18  # points encoded at once when training on many (see HashGrid.forward)


class HashGrid(nn.Module):
    """Hash-grid encoding: [N, d] points in [0, 1] -> [N, n_levels * n_features_per_level] float32."""

    def __init__(
        self,
        n_levels: int,
        n_features_per_level: int,
        log2_hashmap_size: int,
        base_resolution: int,
        per_level_scale: float,
        n_input_dims: int = 3,
    ):
        super().__init__()
        if not 1 <= n_input_dims <= len(_PRIMES):
            raise ValueError(f"n_input_dims must be between 1 and {len(_PRIMES)}, got {n_input_dims}")
        if per_level_scale < 1.0:
            # Coarser-to-finer is what makes the dense levels a prefix of the levels.
            raise ValueError(f"per_level_scale must be >= 1, got {per_level_scale}")
        self.n_levels = int(n_levels)
        self.n_features_per_level = int(n_features_per_level)
        self.log2_hashmap_size = int(log2_hashmap_size)
        self.base_resolution = int(base_resolution)
        self.per_level_scale = float(per_level_scale)
        self.n_input_dims = int(n_input_dims)

        # float32 throughout, like tcnn, so that ceil() lands on the same side.
        log2_scale = torch.log2(torch.tensor(self.per_level_scale, dtype=torch.float32))
        levels = torch.arange(self.n_levels, dtype=torch.float32)
        scales = torch.exp2(levels * log2_scale) * float(self.base_resolution) - 1.0
        table_size = 2**self.log2_hashmap_size

        self.resolutions = [math.ceil(s) + 1 for s in scales.tolist()]
        self.level_is_dense = [r**self.n_input_dims <= table_size for r in self.resolutions]
        # tcnn rounds a level's dense size up to a multiple of 8 (aligned accesses).
        level_sizes = [min((r**self.n_input_dims + 7) // 8 * 8, table_size) for r in self.resolutions]
        self.n_dense_levels = sum(self.level_is_dense)
        self.level_sizes = level_sizes
        self.level_offsets = [sum(level_sizes[:i]) for i in range(self.n_levels)]
        self.n_table_entries = sum(level_sizes)

        multipliers = [
            [r**axis for axis in range(self.n_input_dims)] if dense else list(_PRIMES[: self.n_input_dims])
            for r, dense in zip(self.resolutions, self.level_is_dense)
        ]
        # Device-following constants; not persistent: they follow from the config,
        # and leaving them out keeps the state dict tcnn's ({"params"}).
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("multipliers", torch.tensor(multipliers, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(level_sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(self.level_offsets, dtype=torch.int64), persistent=False)

        self.params = nn.Parameter(
            torch.empty(self.n_table_entries * self.n_features_per_level).uniform_(-1e-4, 1e-4)
        )
        self.use_fused_cpu = True  # the fused CPU kernels where they apply (see forward)
        self.recompute_in_backward = True  # keep only the points for the backward pass (see forward)
        self._layout = None

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels} ({self.n_dense_levels} dense), features={self.n_features_per_level}, "
            f"log2_hashmap_size={self.log2_hashmap_size}, resolutions={self.resolutions[0]}..{self.resolutions[-1]}"
        )

    def reattach(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` given its value ``features`` [N, F] computed without gradients: differentiable in the table.

        On the fused CPU path no second forward pass is run; elsewhere this is ``self(x)``.
        """
        if self._can_fuse(x):
            return hash_grid_cpu.reattach(features, x.float(), self.params, self._fused_layout())
        return self(x)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        return (
            self.use_fused_cpu
            and x.device.type == "cpu"
            and self.n_input_dims == hash_grid_cpu.N_INPUT_DIMS
            and self.n_features_per_level == hash_grid_cpu.N_FEATURES
            and self.params.dtype == torch.float32
            and not (x.requires_grad and torch.is_grad_enabled())
            and hash_grid_cpu.kernels() is not None
        )

    def _fused_layout(self):
        if self._layout is None:
            self._layout = hash_grid_cpu.LevelLayout(self)
        return self._layout

    def corner_indices(self, cell: torch.Tensor) -> torch.Tensor:
        """Table rows [L, 2**d, N] of the corners of the cells whose low vertex is ``cell`` [L, d, N] (int64)."""
        n_levels, n_axes, n_points = cell.shape
        multipliers = self.multipliers[:, :, None]
        per_axis = cell.new_empty(n_levels, n_axes, 2, n_points)  # index terms of the low and high vertex
        low, high = per_axis.unbind(2)
        torch.mul(cell, multipliers, out=low)
        torch.add(low, multipliers, out=high)  # (c + 1) * m = c * m + m
        index = cell.new_empty(n_levels, 2**n_axes, n_points)
        dense, hashed = slice(0, self.n_dense_levels), slice(self.n_dense_levels, None)
        # Dense: the modulo matters only at the far face, where x * scale + 0.5 can
        # reach the vertex one past the grid; tcnn wraps it around, and so do we.
        _combine_corners(per_axis[dense], torch.add, out=index[dense]).remainder_(self.sizes[dense, None, None])
        # Hashed: int64 products keep the low 32 bits of tcnn's uint32 products, and
        # the table size is a power of two, so masking equals tcnn's "% size".
        _combine_corners(per_axis[hashed], torch.bitwise_xor, out=index[hashed]).bitwise_and_(
            self.sizes[hashed, None, None] - 1
        )
        index += self.offsets[:, None, None]
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode points [N, d] in [0, 1] -> features [N, n_levels * n_features_per_level] float32.

        On the CPU, when the points need no gradient (rendering, fitting the
        table), the fused kernels of :mod:`recon.field.hash_grid_cpu` compute
        the same function; ``use_fused_cpu = False`` forces this PyTorch path.
        """
        if self._can_fuse(x):
            return hash_grid_cpu.fused_encode(x.float(), self.params, self._fused_layout())
        if self.recompute_in_backward and torch.is_grad_enabled() and x.shape[0] > RECOMPUTE_CHUNK:
            # Every level's corner indices and values take several KB per point, in the
            # forward pass and again in the backward. In chunks, recomputed in the backward
            # pass, they exist for one chunk at a time and autograd keeps only the points.
            return torch.cat([torch.utils.checkpoint.checkpoint(self._encode, part, use_reentrant=False) for part in x.split(RECOMPUTE_CHUNK)])
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        n_points, n_features = x.shape[0], self.n_features_per_level
        # Layout [levels, ..., points, features]: CPU kernels are fast on long contiguous
        # rows and slow when broadcasting over a short innermost dimension, so points and
        # the (few) features of a table row stay innermost and broadcasts run over outer dims.
        x = x.to(self.params.dtype).t().unsqueeze(-1).expand(-1, -1, n_features).contiguous()  # [d, N, F]
        pos = x * self.scales[:, None, None, None] + 0.5  # [L, d, N, F] in grid units
        cell = pos[..., 0].detach().floor()  # [L, d, N]
        # The input gradient flows through the fractional position only (floor is
        # piecewise constant), which is exactly the derivative of the interpolation.
        # In place: pos is not needed any more, and autograd does not need it either.
        frac = pos.sub_(cell.unsqueeze(-1))
        # The index tensor is the largest temporary: inline so that it is freed right
        # after the gather when autograd does not keep it.
        table = self.params.view(-1, n_features)
        values = table.index_select(0, self.corner_indices(cell.long()).view(-1))
        values = values.view(self.n_levels, 2**self.n_input_dims, n_points, n_features)
        # d-linear interpolation as d rounds of lerps, halving the corners each round:
        # cheaper than forming the 2**d corner weights, and autograd keeps fewer tensors.
        # (unbind rather than indexing: its backward is one stack, not a zero-fill per axis.)
        for axis_frac in frac.unsqueeze(2).unbind(1):  # [L, 1, N, F] per axis
            low, high = values.unflatten(1, (2, -1)).unbind(1)
            values = torch.lerp(low, high, axis_frac)
        return values.squeeze(1).transpose(0, 1).reshape(n_points, self.n_output_dims)


def _float32_output(module, inputs, output):
    return output.float()


def tcnn_hash_grid(tcnn, cfg: FieldConfig, n_input_dims: int = 3) -> nn.Module:
    """tiny-cuda-nn's fused HashGrid for ``cfg``, returning float32 like :class:`HashGrid`.

    It stays a plain ``tcnn.Encoding`` (the cast is a forward hook, not a wrapper)
    so that its state dict is ``{"params"}`` with tcnn's layout, exactly like
    :class:`HashGrid`'s: a checkpoint fitted on a GPU loads into the PyTorch grid
    on a CPU machine and back. ``n_output_dims`` is tcnn's own attribute.
    """
    encoding = tcnn.Encoding(
        n_input_dims=n_input_dims,
        encoding_config={
            "otype": "HashGrid",
            "n_levels": cfg.n_levels,
            "n_features_per_level": cfg.n_features_per_level,
            "log2_hashmap_size": cfg.log2_hashmap_size,
            "base_resolution": cfg.base_resolution,
            "per_level_scale": cfg.per_level_scale,
        },
    )
    # tcnn computes in half precision where that is fastest; callers get float32 either way.
    encoding.register_forward_hook(_float32_output)
    return encoding


TCNN = "tiny-cuda-nn"
NATIVE_DEVICE_TYPES = ("cuda",)  # where tcnn can run


def _build_tcnn():
    """tinycudann, imported and run once on a tiny grid (a build for another GPU or CUDA fails here)."""
    import tinycudann

    tiny = FieldConfig(n_levels=2, log2_hashmap_size=8)
    with torch.cuda.device(0):
        tcnn_hash_grid(tinycudann, tiny)(torch.rand(4, 3, device="cuda"))
    return tinycudann


def _import_tcnn():
    """tinycudann where it loads and runs, else None (one notice; recon uses :class:`HashGrid`)."""
    from recon import accel

    return accel.probe(TCNN, _build_tcnn, "the PyTorch hash grid")


def make_hash_grid(cfg: FieldConfig, device) -> nn.Module:
    """tcnn's fused encoding where it can run (``use_tcnn="auto"``, CUDA, importable), else :class:`HashGrid`.

    Both map [N, 3] in [0, 1] to [N, n_output_dims] float32 and expose ``n_output_dims``.
    """
    if cfg.use_tcnn not in ("auto", "never"):
        raise BadInput(f"field.use_tcnn must be 'auto' or 'never', got '{cfg.use_tcnn}'")
    device = torch.device(device)
    if cfg.use_tcnn == "auto" and device.type in NATIVE_DEVICE_TYPES:
        tcnn = _import_tcnn()
        if tcnn is not None:
            with torch.cuda.device(device):  # tcnn allocates on the current device
                return tcnn_hash_grid(tcnn, cfg)
    grid = HashGrid(
        cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size, cfg.base_resolution, cfg.per_level_scale
    )
    return grid.to(device)
