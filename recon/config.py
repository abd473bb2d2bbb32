"""Typed configuration: one dataclass per pipeline stage, YAML presets, key=value overrides.

A run's configuration is built in three layers, later ones winning:
the dataclass defaults below, a preset from ``configs/`` (or any YAML path),
and ``key=value`` overrides from the command line (threestudio's convention,
e.g. ``fit.steps=500 field.log2_hashmap_size=16``). Unknown keys and values of
the wrong type are rejected with a one-line message (:class:`~recon.errors.BadInput`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, is_dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recon.errors import BadInput, one_line



def _preset_dir() -> Path:
    """Where the named presets live: inside the installed package (a wheel or
    ``pip install .`` ships ``configs/`` as ``recon/configs``), else the
    checkout's top-level ``configs/`` (``launch.py`` and editable installs)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _preset_dir()
DEFAULT_PRESET = "zero123"


def ranged(default, low=None, high=None, choices=None):
    """A config field with its allowed values beside it: ``low <= value <= high``
    (each element, for a list) or one of ``choices``. :func:`check_config`
    enforces them when a config loads; a float must also be finite."""
    metadata = {"low": low, "high": high, "choices": choices}
    if isinstance(default, list):
        return _field(default_factory=lambda: list(default), metadata=metadata)
    return _field(default=default, metadata=metadata)


BIG = 10**7  # "no practical upper bound" for counts of steps and the like


@dataclass
class CameraConfig:
    """Cameras of the fit. All angles in degrees; conventions in recon/camera.py."""

    distance: float = ranged(2.0, 0.1, 100.0)  # camera distance from the origin, fixed as Zero123 expects
    fovy: float = ranged(40.0, 1.0, 170.0)  # vertical field of view
    reference_elevation: float = ranged(0.0, -90.0, 90.0)  # elevation of the input view (``--elevation``)
    elevation_range: List[float] = ranged([-10.0, 60.0], -90.0, 90.0)  # random views: [low, high]
    # Coarse-to-fine schedule: stage i starts at step ``milestones[i]`` and renders
    # ``batch_sizes[i]`` random views of ``resolutions[i]`` pixels a side.
    milestones: List[int] = ranged([0, 600, 1200], 0, BIG)  # starts at 0, increasing
    resolutions: List[int] = ranged([64, 128, 256], 8, 1024)
    batch_sizes: List[int] = ranged([8, 4, 2], 1, 64)
    reference_resolution: int = ranged(256, 16, 1024)  # the input view's resolution for the RGB/mask losses


@dataclass
class FieldConfig:
    """Hash-grid density/albedo field (Mueller et al. 2022)."""

    radius: float = ranged(0.7, 0.1, 10.0)  # the field lives in the box [-radius, radius]^3
    n_levels: int = ranged(16, 1, 32)
    n_features_per_level: int = ranged(2, choices=(1, 2, 4, 8))
    log2_hashmap_size: int = ranged(19, 8, 24)
    base_resolution: int = ranged(16, 2, 1024)
    per_level_scale: float = ranged(1.447269, 1.0, 4.0)  # 16 * 1.447^15 ~ 4096 at the finest level
    hidden_dim: int = ranged(64, 8, 512)
    n_hidden_layers: int = ranged(1, 0, 8)
    # Object-centric SDS starts from a blob of density at the centre so that
    # the first gradients have something to shape.
    density_bias_scale: float = ranged(10.0, 0.0, 100.0)
    density_bias_radius: float = ranged(0.5, 0.01, 10.0)
    use_tcnn: str = ranged("auto", choices=("auto", "never"))  # "auto": tcnn on CUDA when importable


@dataclass
class RenderConfig:
    """Volume rendering."""

    n_samples_per_ray: int = ranged(256, 8, 4096)  # uniform samples across the box (sets the step size)
    occupancy_resolution: int = ranged(128, 8, 512)  # occupancy grid cells a side
    occupancy_threshold: float = ranged(0.01, 0.0, 1.0)  # optical thickness (density x step) below which a cell is empty
    occupancy_update_every: int = ranged(16, 1, BIG)  # steps between occupancy refreshes (every cell each time)
    chunk_rays: int = ranged(32768, 256, 2**24)  # rays per chunk when rendering without gradients
    background: List[float] = ranged([1.0, 1.0, 1.0], 0.0, 1.0)  # RGB


@dataclass
class PriorConfig:
    """The novel-view prior that drives SDS."""

    kind: str = ranged("zero123", choices=("zero123", "reference"))  # reference: a known mesh, for verification
    model: str = "ashawkey/zero123-xl-diffusers"  # hub id, local diffusers dir or .ckpt file
    stable: bool = False  # Stable Zero123 pose vector
    guidance_scale: float = ranged(3.0, 0.0, 100.0)
    image_size: int = ranged(256, 64, 1024)  # Zero123 works on 256x256 images
    # Timestep range as fractions of the 1000 training steps, annealed linearly
    # from ``t_range_start`` to ``t_range_end`` over ``t_anneal_steps`` steps.
    t_range_start: List[float] = ranged([0.02, 0.98], 0.0, 1.0)  # [low, high]
    t_range_end: List[float] = ranged([0.02, 0.50], 0.0, 1.0)  # [low, high]
    t_anneal_steps: int = ranged(1200, 0, BIG)
    grad_clip: Optional[float] = ranged(None, 1e-6, 1e6)  # clip the SDS gradient elementwise
    half_precision: bool = True  # fp16 UNet on CUDA
    # Encode renders one at a time and recompute the VAE encoder's activations in the
    # backward pass: a step keeps one image's activations instead of the batch's, for one
    # more encoder pass (the lowvram preset's choice; recon/cost_model.py prices both).
    recompute_vae: bool = False
    reference_mesh: Optional[str] = None  # for kind=reference


@dataclass
class FitConfig:
    """The optimisation loop."""

    steps: int = ranged(2000, 1, BIG)
    lr: float = ranged(0.01, 1e-8, 10.0)  # hash-grid tables
    lr_mlp: float = ranged(0.001, 1e-8, 10.0)  # the small MLP heads
    lambda_sds: float = ranged(0.1, 0.0, 1e6)
    lambda_rgb: float = ranged(1000.0, 0.0, 1e6)
    lambda_mask: float = ranged(100.0, 0.0, 1e6)
    lambda_orient: float = ranged(0.0, 0.0, 1e6)
    lambda_sparsity: float = ranged(0.0, 0.0, 1e6)
    lambda_opacity: float = ranged(0.0, 0.0, 1e6)
    lambda_normal_smooth: float = ranged(0.0, 0.0, 1e6)
    reference_rays: int = ranged(0, 0, 2**24)  # random reference-view rays per step (0: the whole view)
    checkpoint_every: int = ranged(500, 1, BIG)
    # GPU memory to fit in (``--vram``): each stage's batch size becomes the largest, up to
    # the preset's, whose modelled peak fits (recon/cost_model.py); None keeps the preset's.
    memory_budget_gb: Optional[float] = ranged(None, 1.0, 1024.0)


@dataclass
class ExtractConfig:
    """Fitted field -> clean mesh (recon/mesh/extract.py; docs/design.md, "Extraction")."""

    method: str = ranged("carve", choices=("carve", "density"))  # carve: space carving from depth renders; density: a level
    resolution: int = ranged(256, 32, 1024)  # fine-grid samples along the object's longest side
    threshold: Optional[float] = ranged(None, 0.0, 1e6)  # density level for method=density; None: the automatic level
    min_component_ratio: float = ranged(0.02, 0.0, 1.0)  # drop components smaller than this share of the largest one's faces
    max_faces: Optional[int] = ranged(None, 100, 10**8)  # decimate to this face budget when set
    smoothing: float = ranged(1.0, 0.0, 10.0)  # method=density: blur of the solid before meshing, in voxels (0: mesh the raw density)
    # method=carve: the margin kept in front of each render's depth (which a soft field puts
    # behind its true surface where rays graze it), and the resolution of the depth renders.
    carve_margin: float = ranged(1.5, 0.0, 16.0)  # voxels
    carve_views_resolution: int = ranged(128, 32, 1024)  # pixels a side


@dataclass
class TextureConfig:
    size: int = ranged(1024, 16, 8192)  # texels a side
    mode: str = ranged("texture", choices=("texture", "vertex"))  # UV map or vertex colours
    padding: int = ranged(4, 0, 64)  # texels of seam fill around each UV chart
    bake_depth: float = ranged(0.03, 0.0, 1.0)  # colours are composited along the normal over +-this distance (world units)


@dataclass
class RefineConfig:
    """Texture (and optionally vertex) refinement after the bake (recon/mesh/refine.py; docs/design.md, "Refinement")."""

    steps: int = ranged(150, 0, BIG)  # Adam steps on the texture; 0 turns refinement off
    lr: float = ranged(0.002, 1e-6, 1.0)  # Adam moves every texel by about lr a step: larger is noisy
    resolution: int = ranged(128, 32, 1024)  # pixels a side of the reference and random views
    # samples a side per pixel: dense enough that every visible texel is read
    # (a sparse sampling updates scattered texels and leaves the texture noisy)
    supersampling: int = ranged(3, 1, 8)
    n_views: int = ranged(48, 1, 256)  # random views, rasterised once and reused (too few and the texture overfits them)
    batch_size: int = ranged(2, 1, 64)  # random views per step
    lambda_rgb: float = ranged(1000.0, 0.0, 1e6)  # the reference view's MSE, weighted as in the fit
    lambda_sds: float = ranged(1.0, 0.0, 1e6)
    # The reference prior's truth averaged over supersampling^2 samples a pixel, as the views it
    # is compared with are (one sample a pixel gives stair-stepped outlines); Zero123 ignores it.
    antialiased_truth: bool = False
    # Small vertex offsets along the normals, fitted before the texture through antialiased
    # silhouettes; each of these steps rasterises its views again (slower than a texture step).
    vertex_offsets: bool = False
    vertex_steps: int = ranged(50, 0, BIG)  # Adam steps on the offsets (texture fixed)
    max_offset: float = ranged(0.01, 0.0, 1.0)  # bound on each vertex's offset, fit-frame units
    lr_vertices: float = ranged(0.0002, 0.0, 1.0)  # Adam's step on the offsets, fit-frame units
    lambda_mask: float = ranged(100.0, 0.0, 1e6)  # the reference view's coverage MSE, weighted as in the fit
    lambda_smooth: float = ranged(1e7, 0.0, 1e9)  # squared uniform Laplacian of the displacements


@dataclass
class ExportConfig:
    formats: List[str] = ranged(["glb", "obj"], choices=("glb", "obj"))
    preview: bool = True
    preview_frames: int = ranged(60, 1, 1000)
    preview_resolution: int = ranged(512, 64, 2048)


@dataclass
class GateConfig:
    """Stable Diffusion safety checker on every input image."""

    enabled: bool = True  # off only through --no-safety-check, which warns and is recorded
    model: str = "CompVis/stable-diffusion-safety-checker"
    # Multiplies the per-concept thresholds. Bounded so that a config cannot
    # switch the gate off by accident (nan, inf, 0 or 100 would).
    threshold_scale: float = ranged(1.0, 0.5, 1.5)
    max_side: int = ranged(1536, 224, 8192)  # larger photos are refused before decoding


@dataclass
class PrepareConfig:
    border_ratio: float = ranged(0.2, 0.0, 0.45)  # empty margin around the object, share of the side
    size: int = ranged(256, 64, 2048)  # the prepared view's side in pixels


@dataclass
class EvalConfig:
    """How scored runs are photographed and scored (docs/design.md, "Evaluation")."""

    protocol: str = ranged("recon", choices=("recon", "syncdreamer"))  # see recon/eval/score.py
    n_views: int = ranged(16, 1, 100)
    elevation: float = ranged(30.0, -90.0, 90.0)
    distance: float = ranged(1.5, 0.1, 100.0)
    fovy: float = ranged(49.1, 1.0, 170.0)
    resolution: int = ranged(256, 32, 2048)
    n_surface_points: int = ranged(30000, 100, 10**7)
    iou_resolution: int = ranged(64, 8, 256)
    fscore_threshold: float = ranged(0.05, 1e-4, 1.0)


@dataclass
class Config:
    device: str = ranged("auto", choices=("auto", "cpu", "cuda"))
    seed: int = ranged(0, 0, 2**63 - 1)
    camera: CameraConfig = _field(default_factory=CameraConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    prior: PriorConfig = _field(default_factory=PriorConfig)
    fit: FitConfig = _field(default_factory=FitConfig)
    extract: ExtractConfig = _field(default_factory=ExtractConfig)
    texture: TextureConfig = _field(default_factory=TextureConfig)
    refine: RefineConfig = _field(default_factory=RefineConfig)
    export: ExportConfig = _field(default_factory=ExportConfig)
    gate: GateConfig = _field(default_factory=GateConfig)
    prepare: PrepareConfig = _field(default_factory=PrepareConfig)
    eval: EvalConfig = _field(default_factory=EvalConfig)


def preset_path(preset: str) -> Path:
    """A preset name (``cpu``) or a path to a YAML file."""
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise BadInput(f"config file not found: {preset}")
        return candidate
    named = CONFIG_DIR / f"{preset}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise BadInput(f"unknown config preset '{preset}' (known: {known})")
    return named


def load_config(preset: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults <- preset YAML <- ``key=value`` overrides, validated against the schema and :func:`check_config`."""
    path = preset_path(preset or DEFAULT_PRESET)
    try:
        preset_layer = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors come in many types
        raise BadInput(f"cannot read config {path}: {one_line(error)}") from None
    _refuse_interpolations(preset_layer, f"config {path}")
    return _merge([OmegaConf.structured(Config), preset_layer], overrides or [])


def apply_overrides(config: Config, overrides: List[str], may_change: Optional[Sequence[str]] = None, what: str = "") -> Config:
    """``key=value`` overrides on top of an existing config (``--export-only``, ``--resume``).

    ``may_change``: the keys (or whole sections, e.g. ``texture``) that may be
    overridden; any other key is refused, because the saved state depends on it.
    """
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if may_change is not None and not any(key == k or key.startswith(k + ".") for k in may_change):
            raise BadInput(f"{key} cannot change {what}: the checkpoint was made with it (may change: {', '.join(may_change)})")
    return _merge([OmegaConf.structured(config)], overrides)


def _merge(layers: list, overrides: List[str]) -> Config:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise BadInput(f"malformed override '{item}': expected key=value, e.g. fit.steps=500")
        if "${" in item:
            # An interpolation would be resolved into run.json and error messages
            # (${oc.env:...} copies the environment into files users share).
            raise BadInput(f"override '{item}': interpolations (${{...}}) are not allowed")
    try:
        if overrides:
            layers = layers + [OmegaConf.from_dotlist(list(overrides))]
        config = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as error:
        raise BadInput(f"invalid config: {one_line(error)}") from None
    return check_config(config)


def _refuse_interpolations(node, where: str) -> None:
    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and "${" in value:
            raise BadInput(f"{where}: interpolations (${{...}}) are not allowed, found '{value}'")

    walk(OmegaConf.to_container(node, resolve=False))


def _leaves(node, prefix: str = "") -> Iterator[Tuple[str, object, dict]]:
    """(dotted key, value, field metadata) for every leaf of a config dataclass."""
    for spec in fields(node):
        value = getattr(node, spec.name)
        if is_dataclass(value):
            yield from _leaves(value, f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", value, spec.metadata


def check_config(config: Config) -> Config:
    """Refuse, with one line naming the key, any value a run cannot use.

    Every number finite and within the range written beside its key, every
    mode one of its choices, the lists consistent with each other, and the
    memory the largest buffers need within what the machine has. Runs before
    any model loads or any directory is made.
    """
    for key, value, meta in _leaves(config):
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue  # an Optional left unset
            if isinstance(item, float) and not math.isfinite(item):
                raise BadInput(f"{key} must be a finite number, got {value}")
            if meta.get("choices") is not None and item not in meta["choices"]:
                raise BadInput(f"{key} must be one of {', '.join(map(str, meta['choices']))}; got {value}")
            if meta.get("low") is not None and not meta["low"] <= item <= meta["high"]:
                raise BadInput(f"{key} must be between {meta['low']} and {meta['high']}, got {value}")
    camera = config.camera
    if not len(camera.milestones) == len(camera.resolutions) == len(camera.batch_sizes) >= 1:
        raise BadInput("camera.milestones, camera.resolutions and camera.batch_sizes must have the same length (one per stage)")
    if camera.milestones[0] != 0 or any(b <= a for a, b in zip(camera.milestones, camera.milestones[1:])):
        raise BadInput(f"camera.milestones must start at 0 and increase, got {camera.milestones}")
    for key, pair in (("camera.elevation_range", camera.elevation_range), ("prior.t_range_start", config.prior.t_range_start), ("prior.t_range_end", config.prior.t_range_end)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise BadInput(f"{key} must be [low, high] with low <= high, got {pair}")
    if len(config.render.background) != 3:
        raise BadInput(f"render.background must be an RGB triple, got {config.render.background}")
    if not config.export.formats:
        raise BadInput("export.formats must name at least one of glb, obj")
    _check_memory(config)
    return config


# Bytes per element of the largest buffers (working copies included), for the
# memory check: the extraction grid (density, blurred copy, carve mask,
# marching cubes' input), the texture bake (texel positions, normals, face ids,
# colours, seam fill) and the prepared view.
BYTES_PER_GRID_CELL = 16
BYTES_PER_TEXEL = 64
BYTES_PER_PREPARED_PIXEL = 64


def memory_needed(config: Config) -> Dict[str, int]:
    """Estimated peak bytes of the stages whose size the config sets directly."""
    return {
        "extract.resolution": BYTES_PER_GRID_CELL * config.extract.resolution**3,
        "texture.size": BYTES_PER_TEXEL * config.texture.size**2,
        "prepare.size": BYTES_PER_PREPARED_PIXEL * config.prepare.size**2,
    }


def machine_memory() -> Optional[int]:
    """Physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(config: Config) -> None:
    available = machine_memory()
    if available is None:
        return
    for key, needed in memory_needed(config).items():
        if needed > 0.8 * available:
            value = OmegaConf.select(OmegaConf.structured(config), key)
            raise BadInput(f"{key}={value} needs about {needed / 2**30:.1f} GiB of memory, more than this machine can give ({available / 2**30:.1f} GiB in all)")


def to_dict(config: Config) -> dict:
    """Plain dict of a config, for run.json and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def from_dict(values: dict) -> Config:
    """Rebuild a config saved with :func:`to_dict` (checkpoints, ``--export-only``)."""
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    except OmegaConfBaseException as error:
        raise BadInput(f"invalid saved config: {one_line(error)}") from None
    return check_config(config)
