"""What one fit step costs on a GPU, worked out on any machine without allocating it.

The step priced is recon's fit step with its sizes fixed in advance
(docs/design.md, "Cost model"): the input view's rays and a batch of random
views rendered through the field with gradients, the renders VAE-encoded,
one guided UNet call on [unconditional; conditional], the SDS surrogate loss,
the backward pass and Adam's update. It runs the real modules (recon's
field, the Zero123 prior around a full-size Zero123 built from its shapes) on
fake tensors: every operation works out its output's shape, dtype and device
and computes nothing, so a 1.3 B-parameter model costs no memory here.

* FLOPs: ``torch.utils.flop_counter`` (matrix products, convolutions and
  attention, forward and backward; gathers and pointwise work are not counted).
* Peak memory: :class:`LiveBytes` follows every storage the step creates and
  frees, on top of what is resident (weights, the field, its Adam moments,
  the occupancy grid). It counts tensors, not the CUDA context (see
  ``CUDA_CONTEXT_BYTES``) or the caching allocator's rounding. PyTorch's own
  ``MemTracker`` (torch.distributed._tools) does the same per module, but finds
  parameters through module hooks as they run; a plain count over every
  operation is simpler to check against a measured peak, which a test does.

What fake tensors cannot know is how many samples each ray keeps: the
occupancy grid and the early stop make it depend on the object. The model
keeps ``samples_per_ray(step)`` samples on every ray: the mean depth of
occupied space a ray crosses (``MARCH_DEPTH``, measured on CPU fits) over the
marching step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, List, Optional

import nerfacc
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from recon.camera import random_cameras
from recon.config import Config
from recon.errors import BadInput
from recon.fit import new_fit_state, reference_camera
from recon.prepare import ReferenceView
from recon.prior.architectures import FULL, random_components
from recon.prior.zero123 import Zero123Prior
from recon.render.volume import step_size

# World-space depth of occupied space a ray marches through, averaged over the
# rays of the input view and of the random views at the fit's worst step
# (recon/bench/results/march_depth.json): samples per ray = depth / step.
MARCH_DEPTH = 0.41
CUDA_CONTEXT_BYTES = 512 * 2**20
GIB = 2**30


@dataclass(frozen=True)
class StepShape:
    """The sizes that set one fit step's cost."""

    batch: int  # random views rendered for SDS
    resolution: int  # their side in pixels
    reference_rays: int  # rays of the input view rendered with gradients
    samples_per_ray: int  # samples kept per ray, with gradients
    normals: bool = False  # analytic normals of the random views (a double backward)
    reference_normals: bool = False  # and of the input view (recon never needs them there)


@dataclass
class StepCost:
    flops: int  # one step, forward and backward
    peak_bytes: int  # resident + the step's own peak
    resident_bytes: int  # held between steps: weights, field, Adam state, occupancy grid


def samples_per_ray(step: float) -> int:
    """Samples each ray keeps at marching step ``step`` (world units); see ``MARCH_DEPTH``."""
    return max(1, math.ceil(MARCH_DEPTH / step))


def reference_rays(cfg: Config) -> int:
    """Input-view rays rendered per step: ``fit.reference_rays``, or the whole view when 0."""
    whole = cfg.camera.reference_resolution**2
    return min(cfg.fit.reference_rays, whole) if cfg.fit.reference_rays else whole


def stage_shapes(cfg: Config) -> List[StepShape]:
    """One :class:`StepShape` per coarse-to-fine stage of ``cfg``'s schedule."""
    kept = samples_per_ray(step_size(cfg.field.radius, cfg.render))
    normals = cfg.fit.lambda_orient > 0 or cfg.fit.lambda_normal_smooth > 0
    return [
        StepShape(batch, resolution, reference_rays(cfg), kept, normals)
        for batch, resolution in zip(cfg.camera.batch_sizes, cfg.camera.resolutions)
    ]


def stage_lengths(cfg: Config) -> List[int]:
    """Fit steps spent in each coarse-to-fine stage."""
    bounds = list(cfg.camera.milestones) + [cfg.fit.steps]
    return [max(0, min(bounds[i + 1], cfg.fit.steps) - min(bounds[i], cfg.fit.steps)) for i in range(len(cfg.camera.milestones))]


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, followed through every operation.

    Each operation's outputs are counted once per storage (views and in-place
    results share their input's) and uncounted when the storage is freed.
    ``resident`` tensors, made before, start the count. Works alike on fake
    tensors (whose storages have a size and no memory) and real ones, which is
    how the model is checked against a measured peak.
    """

    def __init__(self, resident=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = {}
        for tensor in resident:
            self._count(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages[key] = weakref.ref(storage, partial(self._freed, key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _freed(self, key: int, size: int, _reference) -> None:
        if self._storages.pop(key, None) is not None:
            self.live -= size


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Real tensors made before the mode (cameras, constants) are read as fake ones.
    return FakeTensorMode(allow_non_fake_inputs=True)


class PricedFit:
    """The state of a fit, as after its first step, on fake tensors unless ``fake=False``
    (the memory model's check runs it for real).

    ``cfg`` gives the field, the prior's settings and the schedule; ``shapes``
    the Zero123 architecture (``recon.prior.architectures``); ``dtype`` the
    UNet's and VAE's (float16, as the prior uses on CUDA).
    ``materialised_attention`` prices attention that builds the whole score
    matrix (the original Zero123 code) instead of a fused kernel;
    ``keep_image_encoder`` keeps the CLIP encoder loaded (threestudio does).
    """

    def __init__(self, cfg: Config, shapes: dict = FULL, dtype: torch.dtype = torch.float16, *, fake: bool = True,
                 materialised_attention: bool = False, keep_image_encoder: bool = False):
        self.cfg = cfg
        self.held: List[torch.nn.Module] = []
        self.mode = _fake_mode() if fake else contextlib.nullcontext()
        camera = reference_camera(cfg)
        self.cameras_generator = torch.Generator().manual_seed(0)
        state = new_fit_state(cfg, "cpu")  # real: the field is small, and its constructor reads values
        if fake:
            from torch._subclasses.fake_tensor import FakeCopyMode

            with FakeCopyMode(self.mode):  # one deepcopy, so the optimiser keeps pointing at the field's (now fake) parameters
                state.field, state.occupancy, state.optimizer = copy.deepcopy((state.field, state.occupancy, state.optimizer))
        self.state = state
        with self.mode:
            encoding = self.state.field.encoding
            if hasattr(encoding, "use_fused_cpu"):
                encoding.use_fused_cpu = False  # price the pure-PyTorch grid, as on a GPU without tiny-cuda-nn
            components = random_components(shapes, torch.device("cpu"), dtype)
            if materialised_attention:
                from diffusers.models.attention_processor import AttnProcessor

                components.unet.set_attn_processor(AttnProcessor())
                components.vae.set_attn_processor(AttnProcessor())
            self.image_encoder = components.image_encoder if keep_image_encoder else None
        # Outside the mode, so that the prior reads the input camera's angles as numbers;
        # operations on the fake modules stay fake (a fake tensor carries its mode).
        size = cfg.prior.image_size
        self.prior = Zero123Prior(cfg.prior, ReferenceView(torch.rand(size, size, 4)), camera, "cpu", components=components, dtype=dtype)
        with self.mode:
            # Adam's moments exist from the first step on: make them, as a step with zero gradients would.
            for parameter in self.state.field.parameters():
                parameter.grad = torch.zeros_like(parameter)
            self.state.optimizer.step()
            self.state.optimizer.zero_grad(set_to_none=True)

    def hold(self, build: Callable[[], torch.nn.Module]) -> None:
        """Build a module (on fake tensors when the fit is fake) and keep it loaded beside the prior."""
        with self.mode:
            self.held.append(build())

    def resident(self) -> List[torch.Tensor]:
        """Every tensor held between steps: weights, the field and its Adam moments, the occupancy grid, the conditioning."""
        modules = [self.state.field, self.prior.unet, self.prior.vae, self.prior.projection, self.image_encoder, *self.held]
        tensors = [t for m in modules if m is not None for t in list(m.parameters()) + list(m.buffers())]
        tensors += [t for t in self.state.occupancy.state_dict().values() if isinstance(t, torch.Tensor)]
        tensors += _adam_moments(self.state.optimizer)
        tensors += [self.prior.clip_embedding, self.prior.cond_latent, self.prior.alphas_cumprod]
        return tensors

    def step(self, shape: StepShape, step_index: int = 0) -> torch.Tensor:
        """One fit step of ``shape``, backward pass and update included; returns the loss."""
        cfg = self.cfg
        with self.mode:
            ref_rgb, ref_opacity = self._render(shape.reference_rays, shape.samples_per_ray, normals=shape.reference_normals)
            loss = cfg.fit.lambda_rgb * F.mse_loss(ref_rgb, torch.ones_like(ref_rgb))
            loss = loss + cfg.fit.lambda_mask * F.mse_loss(ref_opacity, torch.ones_like(ref_opacity))
            rgb, _ = self._render(shape.batch * shape.resolution**2, shape.samples_per_ray, normals=shape.normals)
            cameras = random_cameras(shape.batch, cfg.camera.elevation_range, cfg.camera.distance, cfg.camera.fovy, self.cameras_generator)
            images = rgb.reshape(shape.batch, shape.resolution, shape.resolution, 3)
            loss = loss + cfg.fit.lambda_sds * self.prior.sds_loss(images, cameras, step_index, stats=False)["loss_sds"]
            optimizer = self.state.optimizer
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

    def _render(self, n_rays: int, per_ray: int, normals: bool):
        """(rgb [R, 3], opacity [R, 1]) of ``n_rays`` rays of ``per_ray`` kept samples each, composited as
        recon's CPU path does (a dense [R, K] layout; the GPU's packed layout holds the same samples)."""
        field = self.state.field
        points = (torch.rand(n_rays * per_ray, 3) * 2.0 - 1.0) * field.radius
        if normals:
            density, albedo, _ = field.density_and_normal(points, create_graph=True)
        else:
            density, albedo = field(points)
        step = step_size(field.radius, self.cfg.render)
        t_starts = torch.arange(per_ray, dtype=torch.float32).expand(n_rays, per_ray) * step
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_starts + step, density.reshape(n_rays, per_ray))
        rgb = nerfacc.accumulate_along_rays(weights, albedo.reshape(n_rays, per_ray, 3))
        opacity = nerfacc.accumulate_along_rays(weights, None)
        return rgb + (1.0 - opacity), opacity


def _adam_moments(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [t for moments in optimizer.state.values() for t in moments.values() if isinstance(t, torch.Tensor)]


def _price(fit: PricedFit, resident: List[torch.Tensor], run: Callable[[], object]) -> StepCost:
    """FLOPs and peak memory of ``run()`` on ``fit``, with ``resident`` the tensors held before it."""
    from torch.utils.flop_counter import FlopCounterMode

    with fit.mode:
        tracker = LiveBytes(resident)
    resident_bytes = tracker.live
    del resident
    with FlopCounterMode(display=False) as flops, tracker:
        run()
    return StepCost(flops=int(flops.get_total_flops()), peak_bytes=tracker.peak, resident_bytes=resident_bytes)


def price_step(fit: PricedFit, shape: StepShape, step_index: int = 0) -> StepCost:
    """FLOPs and peak memory of one step of ``shape`` on ``fit``."""
    return _price(fit, fit.resident(), lambda: fit.step(shape, step_index))


def price_refine_step(fit: PricedFit, batch: int, resolution: int, texture_size: int) -> StepCost:
    """FLOPs and peak memory of one texture-refinement step (recon.mesh.refine): SDS on ``batch``
    renders of ``resolution`` pixels a side, differentiable in a ``texture_size``-texel RGB texture
    with Adam's moments. The texture lookup itself (a gather) is left out; the prior dominates."""
    with fit.mode:
        texture = torch.zeros(texture_size, texture_size, 3, requires_grad=True)
        optimizer = torch.optim.Adam([texture])
        texture.grad = torch.zeros_like(texture)
        optimizer.step()  # Adam's moments, as after the first step
    cameras = random_cameras(batch, fit.cfg.camera.elevation_range, fit.cfg.camera.distance, fit.cfg.camera.fovy, fit.cameras_generator)

    def step():
        with fit.mode:
            index = torch.zeros(batch * resolution * resolution, dtype=torch.int64)
            images = texture.view(-1, 3).index_select(0, index).view(batch, resolution, resolution, 3)
            loss = fit.prior.sds_loss(images, cameras, 0, stats=False)["loss_sds"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return _price(fit, fit.resident() + [texture] + _adam_moments(optimizer), step)


# The caching allocator's rounding and fragmentation need a share of the card
# beyond the tensors the model counts.
USABLE_SHARE = 0.9


def usable_bytes(card_gib: float) -> float:
    """Tensor bytes a card of ``card_gib`` GiB can hold: its usable share less the CUDA context."""
    return USABLE_SHARE * card_gib * GIB - CUDA_CONTEXT_BYTES


def card_needed_gib(peak_bytes: int) -> float:
    """The smallest card (GiB) whose :func:`usable_bytes` hold a modelled peak."""
    return (peak_bytes + CUDA_CONTEXT_BYTES) / USABLE_SHARE / GIB


def fits_card(peak_bytes: int, card_gib: float) -> bool:
    """Whether a modelled peak fits a card of ``card_gib`` GiB, with the CUDA context and the allocator's share."""
    return peak_bytes <= usable_bytes(card_gib)


def batch_sizes_for_budget(cfg: Config, budget_gib: float, log=None, shapes: Optional[dict] = None) -> List[int]:
    """Per stage, the largest batch (up to the preset's) whose modelled step fits ``budget_gib``.

    Priced with the full-size Zero123-XL in the dtype CUDA would use. A step's
    peak grows linearly with the batch (each view adds the same renders,
    latents and activations), so one price at batch 1 and one at the preset's
    batch give the answer, which is then priced to confirm. Refuses (BadInput)
    a budget that batch 1 does not fit. ``shapes``: another architecture (tests).
    """
    fit = PricedFit(cfg, shapes or FULL, torch.float16 if cfg.prior.half_precision else torch.float32)
    chosen = []
    for index, shape in enumerate(stage_shapes(cfg)):
        peak = price_step(fit, shape).peak_bytes
        batch = shape.batch
        if not fits_card(peak, budget_gib):
            one = peak if batch == 1 else price_step(fit, replace(shape, batch=1)).peak_bytes
            if not fits_card(one, budget_gib):
                raise BadInput(f"fit.memory_budget_gb={budget_gib:g}: stage {index} ({shape.resolution} px) needs about {card_needed_gib(one):.1f} GB even with one view; try --config lowvram")
            per_view = (peak - one) / (batch - 1)
            batch = max(1, min(batch - 1, int((usable_bytes(budget_gib) - one) // per_view) + 1))
            while batch > 1 and not fits_card(price_step(fit, replace(shape, batch=batch)).peak_bytes, budget_gib):
                batch -= 1
        if log is not None:
            log(f"stage {index} ({shape.resolution} px): {batch} views per step fit {budget_gib:g} GB")
        chosen.append(batch)
    return chosen


def fit_to_budget(cfg: Config, log=None) -> Config:
    """``cfg`` with its batch sizes chosen for ``fit.memory_budget_gb`` (unchanged when that is unset)."""
    budget = cfg.fit.memory_budget_gb
    if budget is None:
        return cfg
    if log is not None:
        log(f"sizing the batches for {budget:g} GB with the cost model (a minute or two)")
    sized = copy.deepcopy(cfg)
    sized.camera.batch_sizes = batch_sizes_for_budget(cfg, budget, log)
    return sized
