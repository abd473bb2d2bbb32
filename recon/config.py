"""Typed configuration: one dataclass per pipeline stage, YAML presets, key=value overrides.

A run's configuration is built in three layers, later ones winning:
the dataclass defaults below, a preset from ``configs/`` (or any YAML path),
and ``key=value`` overrides from the command line (threestudio's convention,
e.g. ``fit.steps=500 field.log2_hashmap_size=16``). Unknown keys and values of
the wrong type are rejected with a one-line message (:class:`~recon.errors.BadInput`).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recon.errors import BadInput



def _preset_dir() -> Path:
    """Where the named presets live: inside the installed package (a wheel or
    ``pip install .`` ships ``configs/`` as ``recon/configs``), else the
    checkout's top-level ``configs/`` (``launch.py`` and editable installs)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _preset_dir()
DEFAULT_PRESET = "zero123"


@dataclass
class CameraConfig:
    """Cameras of the fit. All angles in degrees; conventions in recon/camera.py."""

    distance: float = 2.0  # camera distance from the origin, fixed as Zero123 expects
    fovy: float = 40.0  # vertical field of view
    reference_elevation: float = 0.0  # elevation of the input view (``--elevation``)
    elevation_range: List[float] = _field(default_factory=lambda: [-10.0, 60.0])  # random views
    # Coarse-to-fine schedule: stage i starts at step ``milestones[i]`` and renders
    # ``batch_sizes[i]`` random views of ``resolutions[i]`` pixels a side.
    milestones: List[int] = _field(default_factory=lambda: [0, 600, 1200])
    resolutions: List[int] = _field(default_factory=lambda: [64, 128, 256])
    batch_sizes: List[int] = _field(default_factory=lambda: [8, 4, 2])
    reference_resolution: int = 256  # the input view's resolution for the RGB/mask losses


@dataclass
class FieldConfig:
    """Hash-grid density/albedo field (Mueller et al. 2022)."""

    radius: float = 0.7  # the field lives in the box [-radius, radius]^3
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269  # 16 * 1.447^15 ~ 4096 at the finest level
    hidden_dim: int = 64
    n_hidden_layers: int = 1
    # Object-centric SDS starts from a blob of density at the centre so that
    # the first gradients have something to shape.
    density_bias_scale: float = 10.0
    density_bias_radius: float = 0.5
    use_tcnn: str = "auto"  # "auto" (CUDA and importable), "never"


@dataclass
class RenderConfig:
    """Volume rendering."""

    n_samples_per_ray: int = 256  # uniform samples across the box (sets the step size)
    occupancy_resolution: int = 128  # occupancy grid cells a side
    occupancy_threshold: float = 0.01  # opacity of one step below which a cell is empty
    occupancy_update_every: int = 16  # steps between occupancy refreshes
    occupancy_warmup_steps: int = 256  # nerfacc: refresh every cell before this step
    chunk_rays: int = 32768  # rays per chunk when rendering without gradients
    background: List[float] = _field(default_factory=lambda: [1.0, 1.0, 1.0])


@dataclass
class PriorConfig:
    """The novel-view prior that drives SDS."""

    kind: str = "zero123"  # "zero123" or "reference" (ground-truth mesh, for verification)
    model: str = "ashawkey/zero123-xl-diffusers"  # hub id, local diffusers dir or .ckpt file
    stable: bool = False  # Stable Zero123 pose vector
    guidance_scale: float = 3.0
    image_size: int = 256  # Zero123 works on 256x256 images
    # Timestep range as fractions of the 1000 training steps, annealed linearly
    # from ``t_range_start`` to ``t_range_end`` over ``t_anneal_steps`` steps.
    t_range_start: List[float] = _field(default_factory=lambda: [0.02, 0.98])
    t_range_end: List[float] = _field(default_factory=lambda: [0.02, 0.50])
    t_anneal_steps: int = 1200
    grad_clip: Optional[float] = None  # clip the SDS gradient elementwise
    half_precision: bool = True  # fp16 UNet on CUDA
    reference_mesh: Optional[str] = None  # for kind=reference


@dataclass
class FitConfig:
    """The optimisation loop."""

    steps: int = 2000
    lr: float = 0.01  # hash-grid tables
    lr_mlp: float = 0.001  # the small MLP heads
    lambda_sds: float = 0.1
    lambda_rgb: float = 1000.0
    lambda_mask: float = 100.0
    lambda_orient: float = 0.0
    lambda_sparsity: float = 0.0
    lambda_opacity: float = 0.0
    lambda_normal_smooth: float = 0.0
    reference_rays: int = 0  # random reference-view rays per step (0: the whole view)
    checkpoint_every: int = 500


@dataclass
class ExtractConfig:
    """Fitted field -> clean mesh (recon/mesh/extract.py; docs/design.md, "Extraction")."""

    method: str = "carve"  # "carve" (space carving from depth renders) or "density" (a density level)
    resolution: int = 256  # fine-grid samples along the object's longest side
    threshold: Optional[float] = None  # density level for method=density; None: the automatic level
    min_component_ratio: float = 0.02  # drop components smaller than this share of the largest one's faces
    max_faces: Optional[int] = None  # decimate to this face budget when set
    smoothing: float = 1.0  # method=density: blur of the solid before meshing, in voxels (0: mesh the raw density)
    # method=carve: the margin kept in front of each render's depth (which a soft field puts
    # behind its true surface where rays graze it), and the resolution of the depth renders.
    carve_margin: float = 1.5  # voxels
    carve_views_resolution: int = 128  # pixels a side

@dataclass
class TextureConfig:
    size: int = 1024
    mode: str = "texture"  # "texture" (UV map) or "vertex" (vertex colours)
    padding: int = 4  # texels of seam fill around each UV chart
    bake_depth: float = 0.03  # colours are composited along the normal over +-this distance (world units)


@dataclass
class ExportConfig:
    formats: List[str] = _field(default_factory=lambda: ["glb", "obj"])
    preview: bool = True
    preview_frames: int = 60
    preview_resolution: int = 512


@dataclass
class GateConfig:
    """Stable Diffusion safety checker on every input image."""

    enabled: bool = True
    model: str = "CompVis/stable-diffusion-safety-checker"
    threshold_scale: float = 1.0  # multiplies the per-concept thresholds
    max_side: int = 1536


@dataclass
class PrepareConfig:
    border_ratio: float = 0.2
    size: int = 256


@dataclass
class EvalConfig:
    """How scored runs are photographed and scored (docs/design.md, "Evaluation")."""

    protocol: str = "recon"  # "recon" (our bounds) or "syncdreamer" (SyncDreamer's eval_mesh.py), see recon/eval/score.py
    n_views: int = 16
    elevation: float = 30.0
    distance: float = 1.5
    fovy: float = 49.1
    resolution: int = 256
    n_surface_points: int = 30000
    iou_resolution: int = 64
    fscore_threshold: float = 0.05


@dataclass
class Config:
    device: str = "auto"  # "auto", "cpu" or "cuda"
    seed: int = 0
    camera: CameraConfig = _field(default_factory=CameraConfig)
    field: FieldConfig = _field(default_factory=FieldConfig)
    render: RenderConfig = _field(default_factory=RenderConfig)
    prior: PriorConfig = _field(default_factory=PriorConfig)
    fit: FitConfig = _field(default_factory=FitConfig)
    extract: ExtractConfig = _field(default_factory=ExtractConfig)
    texture: TextureConfig = _field(default_factory=TextureConfig)
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
    """Defaults <- preset YAML <- ``key=value`` overrides, validated against the schema."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    path = preset_path(preset or DEFAULT_PRESET)
    try:
        layers.append(OmegaConf.load(path))
    except Exception as error:  # YAML syntax errors come in many types
        raise BadInput(f"cannot read config {path}: {_one_line(error)}") from None
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise BadInput(f"malformed override '{item}': expected key=value, e.g. fit.steps=500")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise BadInput(f"invalid config: {_one_line(error)}") from None


def apply_overrides(config: Config, overrides: List[str]) -> Config:
    """``key=value`` overrides on top of an existing config (``--export-only``, ``--resume``)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise BadInput(f"malformed override '{item}': expected key=value, e.g. fit.steps=500")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise BadInput(f"invalid config: {_one_line(error)}") from None


def to_dict(config: Config) -> dict:
    """Plain dict of a config, for run.json and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def from_dict(values: dict) -> Config:
    """Rebuild a config saved with :func:`to_dict` (checkpoints, ``--export-only``)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    except OmegaConfBaseException as error:
        raise BadInput(f"invalid saved config: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
