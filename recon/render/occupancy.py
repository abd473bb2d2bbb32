"""Empty-space skipping: an occupancy grid over the field's box, and ray sampling through it.

Two implementations of one function. On CUDA, nerfacc's ``OccGridEstimator``
(fused kernels). Elsewhere a pure-PyTorch grid with the same update rule
(exponential moving max of per-step opacity, binarised against
``min(mean, threshold)``) and the same sampling rule (fixed steps from where
the ray enters the box, kept where their midpoint lies in an occupied cell
and before the box exit). Both return packed samples sorted by ray:
``(ray_indices [S], t_starts [S], t_ends [S])``. The rule, as read from
nerfacc's source, is written out in :class:`TorchOccupancyGrid`.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from recon.render import occupancy_cpu

Samples = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
EARLY_STOP_EPS = 1e-4  # nerfacc's default: a sample counts while the transmittance before it is at least this


def exclusive_sum_per_ray(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Sum of the earlier samples' values on the same ray, for packed samples [S] sorted by ray.

    One cumulative sum over the whole batch minus its value at each ray's first
    sample. In float64: in float32 the running total of a large batch loses the
    small per-ray sums to rounding (an error of several units of optical depth
    after 16k rays).
    """
    total = torch.cumsum(values.double(), 0)
    counts = torch.bincount(ray_indices, minlength=n_rays)
    before_ray = torch.cumsum(counts, 0) - counts  # index of each ray's first sample
    start = (total - values)[before_ray.clamp(max=max(values.numel() - 1, 0))]
    return (total - values - start[ray_indices]).to(values.dtype)


def before_opaque(densities: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Which packed samples [S] a ray reaches while its transmittance is at least ``EARLY_STOP_EPS`` (nerfacc's early stop).

    Transmittance before sample i is ``exp(-sum_{j < i on its ray} sigma_j (t_end_j - t_start_j))``;
    nerfacc's ``render_visibility_from_density`` keeps ``transmittance >= early_stop_eps``.
    """
    # Past an optical depth of 30 (transmittance 1e-13) more makes no difference; the cap keeps the sums small.
    optical_depth = (densities * (t_ends - t_starts)).clamp(max=30.0)
    return torch.exp(-exclusive_sum_per_ray(optical_depth, ray_indices, n_rays)) >= EARLY_STOP_EPS


MARCH_SLAB = 8  # samples per ray evaluated per round by evaluate_until_opaque


def evaluate_until_opaque(evaluate: Callable, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor, n_rays: int, slab: int = MARCH_SLAB):
    """Evaluate packed samples [S] (sorted by ray, then t) front to back, skipping what early stop would drop.

    ``evaluate(index)`` gives the densities [K] (and any other per-sample
    tensors, as a tuple) of the samples ``index`` [K]. Samples are evaluated
    ``slab`` per ray per round; a ray stops once its transmittance is below
    ``EARLY_STOP_EPS``. Returns ``(index [M], densities [M], *others)`` of the
    samples :func:`before_opaque` keeps, in packed order: the same samples,
    without evaluating the ones behind an opaque surface. ``S`` must be > 0.
    """
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # each ray's first sample
    depth = torch.zeros(n_rays, dtype=torch.float64, device=ray_indices.device)  # optical depth reached so far
    opaque_depth = -math.log(EARLY_STOP_EPS)
    steps = torch.arange(slab, device=ray_indices.device)
    rays = counts.nonzero().squeeze(1)  # rays still marching, ascending
    buffers, kept = None, []
    for start in range(0, int(counts.max()) if counts.numel() else 0, slab):
        rays = rays[(counts[rays] > start) & (depth[rays] <= opaque_depth)]
        if rays.numel() == 0:
            break
        # the next ``slab`` samples of each marching ray: sorted by ray, then t
        valid = start + steps[None] < counts[rays, None]
        index = (first[rays, None] + start + steps[None])[valid]
        outputs = evaluate(index)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if buffers is None:
            buffers = [value.new_empty((ray_indices.numel(),) + value.shape[1:]) for value in outputs]
        for buffer, value in zip(buffers, outputs):
            buffer[index] = value
        sample_rays = ray_indices[index]
        optical = (outputs[0] * (t_ends[index] - t_starts[index])).clamp(max=30.0).double()
        before = depth[sample_rays] + exclusive_sum_per_ray(optical, sample_rays, n_rays)
        kept.append(index[before <= opaque_depth])
        depth.index_add_(0, sample_rays, optical)
    kept = torch.sort(torch.cat(kept)).values  # back to the packed order
    return (kept,) + tuple(buffer[kept] for buffer in buffers)


def ray_box_intersection(origins: torch.Tensor, directions: torch.Tensor, radius: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays with the box [-radius, radius]^3 (t_near >= 0; miss: t_near >= t_far)."""
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far


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
) -> Samples:
    """The steps of each ray that fall in occupied cells, packed and sorted by ray, then distance.

    Rays [R, 3] step from their box entry ``t_near`` [R]: step ``k`` spans
    ``t_near + (k + offsets) * step_size`` plus ``step_size`` (``offsets`` [R]
    in [0, 1): stratification), for ``k < n_steps``. A step is kept when its
    midpoint lies before ``t_far`` [R] and in a cell where ``binary``
    [G, G, G] (over the box [-radius, radius]^3) is set: nerfacc's
    ``traverse_grids``, whose last step may end up to half a step past
    ``t_far``. The pure-PyTorch reference of
    :func:`recon.render.occupancy_cpu.march_occupied`.
    """
    t_starts = t_near[:, None] + (torch.arange(n_steps, device=origins.device)[None] + offsets[:, None]) * step_size
    t_ends = t_starts + step_size
    t_mid = 0.5 * (t_starts + t_ends)
    midpoints = origins[:, None] + directions[:, None] * t_mid[..., None]
    keep = (t_mid < t_far[:, None]) & occupied_cells(midpoints, binary, radius)
    ray_indices, step_indices = keep.nonzero(as_tuple=True)  # row-major: sorted by ray, then t
    return ray_indices, t_starts[ray_indices, step_indices], t_ends[ray_indices, step_indices]


def occupied_cells(points: torch.Tensor, binary: torch.Tensor, radius: float) -> torch.Tensor:
    """Whether each world point [..., 3] lies in a cell where ``binary`` [G, G, G] is set (False outside the box)."""
    resolution = binary.shape[0]
    unit = (points / radius + 1.0) * 0.5
    inside = ((unit >= 0.0) & (unit < 1.0)).all(dim=-1)
    index = (unit.clamp(0.0, 1.0 - 1e-6) * resolution).long()
    return inside & binary[index[..., 0], index[..., 1], index[..., 2]]


class TorchOccupancyGrid:
    """Occupancy grid in plain PyTorch (CPU path, and the reference for the CUDA one).

    The rule nerfacc 0.5.3 applies (``OccGridEstimator._update`` and
    ``sampling``, ``traverse_grids`` in ``cuda/csrc/grid.cu``), which this grid follows:

    * update: one point per refreshed cell, uniform inside it
      (``(index + rand) / resolution`` over the box); ``occ = max(occ * ema_decay,
      occ_eval_fn(point))`` with ``ema_decay`` 0.95; then ``binary = occ > thre``
      where ``thre = min(mean(occ), occ_thre)``, the mean over every cell not
      marked invisible (recon marks none), ``occ_thre`` 0.01 by default;
    * which cells: all of them while ``step < warmup_steps`` (256), afterwards
      a quarter of the cells drawn uniformly plus up to as many occupied ones;
    * sampling: per ray ``t0 = max(near_plane, t_min)`` (plus ``rand *
      step`` when stratified), steps ``[t0 + k step, t0 + (k + 1) step]``,
      kept while the midpoint is before ``min(far_plane, t_max)`` and lies in
      an occupied cell (cells are walked with a DDA; a step belongs to the
      cell of its midpoint);
    * with ``sigma_fn``: samples kept while the transmittance before them is
      ``>= early_stop_eps`` (1e-4); ``alpha_thre`` (default 0, unused here)
      would be capped at ``mean(occ)``.

    Where recon differs, on purpose: every update refreshes every cell (the
    warmup rule throughout: at recon's resolutions of 32-128 cells a side that
    is cheap, and a grid that never skips a cell cannot keep a stale one); the
    grid starts all occupied rather than all empty (nothing is skipped before
    the first update); random draws come from the caller's generator, so
    runs and resumes repeat (nerfacc draws from the device's global RNG).
    """

    def __init__(self, radius: float, resolution: int, device):
        self.radius = radius
        self.resolution = resolution
        self.device = torch.device(device)
        n = resolution**3
        # Everything counts as occupied until the first update; the running
        # opacity starts at zero (as nerfacc's does) so that update decides alone.
        self.occupancy = torch.zeros(n, device=self.device)
        self.binary = torch.ones(resolution, resolution, resolution, dtype=torch.bool, device=self.device)
        self.use_fused_cpu = True  # recon.render.occupancy_cpu's kernel where it is available

    def _cell_centres(self) -> torch.Tensor:
        r = self.resolution
        index = torch.arange(r, device=self.device)
        grid = torch.stack(torch.meshgrid(index, index, index, indexing="ij"), dim=-1).reshape(-1, 3)
        return grid

    def update(self, thickness_fn: Callable[[torch.Tensor], torch.Tensor], threshold: float, ema_decay: float = 0.95, generator=None) -> None:
        """Refresh every cell from ``thickness_fn`` at a random point inside it.

        ``thickness_fn``: world points [P, 3] -> optical thickness of one
        marching step there, density x step size [P] (nerfacc's ``occ_eval_fn``).
        A cell is occupied while its running maximum is above
        ``min(mean over the cells, threshold)`` (nerfacc's ``occ_thre``).
        """
        cells = self._cell_centres().float()
        jitter = torch.rand(cells.shape, generator=generator).to(self.device)
        points = ((cells + jitter) / self.resolution * 2.0 - 1.0) * self.radius
        with torch.no_grad():
            fresh = torch.cat([thickness_fn(chunk).reshape(-1) for chunk in points.split(262144)])
        self.occupancy = torch.maximum(self.occupancy * ema_decay, fresh)
        cut = min(self.occupancy.mean().item(), threshold)
        self.binary = (self.occupancy > cut).reshape(self.resolution, self.resolution, self.resolution)

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Whether each world point [..., 3] lies in an occupied cell (False outside the box)."""
        return occupied_cells(points, self.binary, self.radius)

    def sample(
        self, origins: torch.Tensor, directions: torch.Tensor, step_size: float, stratified: bool, sigma_fn=None, generator=None
    ) -> Samples:
        """Fixed-step samples from the box entry, kept where the grid is occupied.

        With ``sigma_fn`` (densities of packed samples, evaluated without
        gradients), samples behind the point where a ray's transmittance drops
        below ``EARLY_STOP_EPS`` are dropped too: nerfacc's rule, so that the
        costly pass with gradients only sees samples that can contribute.
        """
        t_near, t_far = ray_box_intersection(origins, directions, self.radius)
        n_steps = math.ceil(2.0 * math.sqrt(3.0) * self.radius / step_size)
        if stratified:
            offsets = torch.rand(origins.shape[0], generator=generator).to(origins.device)
        else:
            offsets = torch.zeros(origins.shape[0], device=origins.device)
        args = (origins, directions, t_near, t_far, offsets, step_size, n_steps, self.binary, self.radius)
        fused = occupancy_cpu.march_occupied(*args) if origins.device.type == "cpu" and self.use_fused_cpu else None
        ray_indices, t_starts, t_ends = fused if fused is not None else march_occupied(*args)
        if sigma_fn is None or ray_indices.numel() == 0:
            return ray_indices, t_starts, t_ends
        with torch.no_grad():
            alive = before_opaque(sigma_fn(t_starts, t_ends, ray_indices), t_starts, t_ends, ray_indices, origins.shape[0])
        return ray_indices[alive], t_starts[alive], t_ends[alive]

    def state_dict(self) -> dict:
        return {"occupancy": self.occupancy.cpu(), "binary": self.binary.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.occupancy = state["occupancy"].to(self.device)
        self.binary = state["binary"].to(self.device)

    @property
    def occupied_fraction(self) -> float:
        return self.binary.float().mean().item()


class NerfaccOccupancyGrid:
    """nerfacc's CUDA occupancy grid behind the same interface.

    Stratification offsets are drawn here from the caller's generator and
    passed to nerfacc as the start of each ray (``t_min``), so given the same
    grid and generator this grid's samples are the torch grid's. The update's
    jitter is nerfacc's own (the device's RNG).
    """

    def __init__(self, radius: float, resolution: int, device):
        import nerfacc

        self.radius = radius
        self.resolution = resolution
        self.estimator = nerfacc.OccGridEstimator(
            roi_aabb=[-radius, -radius, -radius, radius, radius, radius], resolution=resolution, levels=1
        ).to(device)
        # Like the torch grid: all cells occupied until the first update.
        self.estimator.binaries.fill_(True)

    def update(self, thickness_fn, threshold: float, ema_decay: float = 0.95, generator=None) -> None:
        # step 0 with warmup forces nerfacc to refresh every cell, as the torch grid does.
        self.estimator.train()
        self.estimator.update_every_n_steps(
            step=0, occ_eval_fn=lambda x: thickness_fn(x).reshape(-1, 1), occ_thre=threshold, ema_decay=ema_decay, warmup_steps=1, n=1
        )

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        unit = (points / self.radius + 1.0) * 0.5
        inside = ((unit >= 0.0) & (unit < 1.0)).all(dim=-1)
        index = (unit.clamp(0.0, 1.0 - 1e-6) * self.resolution).long()
        return inside & self.estimator.binaries[0][index[..., 0], index[..., 1], index[..., 2]]

    def sample(self, origins, directions, step_size: float, stratified: bool, sigma_fn=None, generator=None) -> Samples:
        t_near, t_far = ray_box_intersection(origins, directions, self.radius)
        if stratified:
            # nerfacc's stratification (start + rand * step), with recon's generator
            t_near = t_near + torch.rand(origins.shape[0], generator=generator).to(origins.device) * step_size
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins.contiguous(),
            directions.contiguous(),
            sigma_fn=sigma_fn,
            early_stop_eps=EARLY_STOP_EPS,
            t_min=t_near.contiguous(),
            t_max=t_far.clamp(min=0.0).contiguous(),
            render_step_size=step_size,
            stratified=False,
        )
        return ray_indices.long(), t_starts, t_ends

    def state_dict(self) -> dict:
        return {"occupancy": self.estimator.occs.cpu(), "binary": self.estimator.binaries[0].cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.estimator.occs.copy_(state["occupancy"].reshape(self.estimator.occs.shape))
        self.estimator.binaries[0].copy_(state["binary"])

    @property
    def occupied_fraction(self) -> float:
        return self.estimator.binaries.float().mean().item()


NERFACC_KERNELS = "nerfacc CUDA kernels"
NATIVE_DEVICE_TYPES = ("cuda",)  # where nerfacc's kernels can run


def _build_nerfacc_kernels() -> bool:
    """Run each nerfacc kernel recon uses once, on a tiny grid.

    nerfacc compiles its CUDA extension on first use (a JIT build that fails
    on a box without a matching toolkit); doing it here, inside
    :func:`recon.accel.probe`, turns that failure into a notice and a fallback.
    """
    import nerfacc

    device = torch.device(NATIVE_DEVICE_TYPES[0])
    grid = NerfaccOccupancyGrid(1.0, 4, device)
    grid.update(lambda x: torch.ones(x.shape[0], device=x.device), threshold=0.01)
    origins = torch.tensor([[0.0, 0.0, -2.0]], device=device)
    directions = torch.tensor([[0.0, 0.0, 1.0]], device=device)
    ray_indices, t_starts, t_ends = grid.sample(origins, directions, 0.1, stratified=False)
    densities = torch.ones_like(t_starts)
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, densities, ray_indices=ray_indices, n_rays=1)
    nerfacc.accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=1)
    return True


def use_nerfacc(device) -> bool:
    """Whether nerfacc's kernels serve ``device``: a GPU, and the kernels built (probed once)."""
    if torch.device(device).type not in NATIVE_DEVICE_TYPES:
        return False
    from recon import accel

    return accel.probe(NERFACC_KERNELS, _build_nerfacc_kernels, "the PyTorch occupancy grid and compositing") is not None


def make_occupancy_grid(radius: float, resolution: int, device):
    """nerfacc's grid where its kernels run (a GPU), the torch grid everywhere else."""
    if use_nerfacc(device):
        return NerfaccOccupancyGrid(radius, resolution, device)
    return TorchOccupancyGrid(radius, resolution, device)
