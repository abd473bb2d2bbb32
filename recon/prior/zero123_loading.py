"""Loading Zero123 weights: hub id, diffusers folder or original ``.ckpt``, one result type.

Every source ends as :class:`Zero123Components`, built from diffusers and
transformers classes only. The custom pipeline classes that weight repositories
name in ``model_index.json`` (``Zero123Pipeline``, ``CCProjection``,
``CLIPCameraProjection``) are never imported: no code runs from a weights
repository. The camera projection is a plain ``nn.Linear`` sized by its weight.

Layouts handled (all dimensions read from configs or weight shapes):

* the projection folder is ``cc_projection`` (kxic / diffusers community
  pipeline: ``CCProjection``, parameter ``projection``) or
  ``clip_camera_projection`` (ashawkey's pipeline: ``CLIPCameraProjection``,
  parameter ``proj``);
* ``.safetensors`` or ``.bin`` weights (``.bin`` read with ``weights_only=True``),
  plain or ``fp16`` variant files;
* original Lightning checkpoints, converted in process (``ckpt_conversion``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from recon import hub
from recon.errors import MissingWeights, one_line
from recon.prior.sds import scaled_linear_alphas_cumprod

DEFAULT_REPO = "ashawkey/zero123-xl-diffusers"
PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
# OpenAI CLIP's normalisation, used when a folder has no preprocessor config (and for .ckpt files,
# whose FrozenCLIPImageEmbedder hard-codes these values).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CKPT_HINT = (
    "download one, e.g. `hf download stabilityai/stable-zero123 stable_zero123.ckpt --local-dir pretrained` "
    "(Stable Zero123) or `hf download cvlab/zero123-weights zero123-xl.ckpt --local-dir pretrained` "
    f"(Zero123-XL), or use a diffusers repo id such as prior.model={DEFAULT_REPO}"
)


@dataclass
class Zero123Components:
    """Everything the Zero123 prior needs, whatever the on-disk layout was."""

    unet: nn.Module  # UNet2DConditionModel, in_channels = 2 x latent channels
    vae: nn.Module  # AutoencoderKL
    image_encoder: Optional[nn.Module]  # CLIPVisionModelWithProjection (freed once the input is embedded)
    projection: nn.Linear  # cat[clip embedding, pose (4)] -> cross-attention dim
    clip_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    clip_std: Tuple[float, ...] = OPENAI_CLIP_STD
    clip_size: int = 224  # the CLIP encoder's input resolution
    alphas_cumprod: torch.Tensor = field(default_factory=scaled_linear_alphas_cumprod)  # [T]
    scheduler_config: Dict = field(default_factory=dict)
    source: str = ""  # where the weights came from, for run.json

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def load_zero123(
    source: str = DEFAULT_REPO,
    device=None,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: Optional[str] = None,
    local_files_only: bool = False,
) -> Zero123Components:
    """Load Zero123 from a hub repo id, a local diffusers folder or an original ``.ckpt`` file.

    Hub ids are resolved through the local Hugging Face cache; when the hub cannot be
    reached (offline, ``HF_HUB_OFFLINE=1`` or ``local_files_only``) the cached snapshot
    is used. Anything missing raises :class:`MissingWeights` saying what to download.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        components = _load_checkpoint(path, dtype)
    elif path.is_dir():
        components = _load_diffusers_folder(path, dtype, hint=f"re-download the folder or pass prior.model={DEFAULT_REPO}")
    elif hub.looks_like_path(str(source)):
        raise MissingWeights(f"Zero123 weights not found: {source} does not exist; {CKPT_HINT}")
    else:
        folder = _resolve_repo(str(source), dtype, cache_dir, local_files_only)
        components = _load_diffusers_folder(folder, dtype, hint=f"run {hub.download_command(str(source))}")
    components.source = str(source)
    _check_consistent(components, str(source))
    for module in (components.unet, components.vae, components.image_encoder, components.projection):
        if module is not None:
            if next(module.parameters()).dtype != dtype:  # already right when from_pretrained set it
                module.to(dtype=dtype)
            module.to(device=device).eval().requires_grad_(False)
    return components


# ----------------------------------------------------------------------------- hub


def _resolve_repo(repo_id: str, dtype: torch.dtype, cache_dir, local_files_only: bool) -> Path:
    """A local snapshot folder of ``repo_id``: fetched when online, else taken from the cache."""
    from huggingface_hub import list_repo_files, snapshot_download

    online_error = None
    if not (local_files_only or hub.offline()):
        try:
            patterns = _download_patterns(list_repo_files(repo_id), prefer_fp16=dtype == torch.float16)
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
        except Exception as error:  # no network, hub down, repo gated: fall back to the cache
            online_error = error
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception:
        reason = f" (the hub said: {one_line(online_error)})" if online_error is not None else " (offline)"
        raise MissingWeights(
            f"Zero123 weights '{repo_id}' are not in the Hugging Face cache{reason}; "
            f"run {hub.download_command(repo_id)} on a machine with internet access "
            "(or point prior.model at a local diffusers folder or .ckpt file)"
        ) from None


def _download_patterns(repo_files: Sequence[str], prefer_fp16: bool) -> List[str]:
    """Configs plus one weight format per component: a repo may hold fp32, fp16, .bin and .safetensors copies."""
    patterns = ["model_index.json", "*/*.json", "*.txt"]
    folders = sorted({name.split("/")[0] for name in repo_files if "/" in name})
    # weights only for what the prior runs: not e.g. a 1.2 GB safety_checker/
    needed = [f for f in folders if f in ("unet", "vae", "image_encoder") or "projection" in f.lower()]
    for folder in needed:
        names = [name.split("/", 1)[1] for name in repo_files if name.startswith(folder + "/") and name.count("/") == 1]
        patterns += [f"{folder}/{name}" for name in _pick_weight_files(names, prefer_fp16)]
    return patterns


def _pick_weight_files(names: Sequence[str], prefer_fp16: bool) -> List[str]:
    """The weight files of one variant and one format (safetensors over bin)."""
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    fp16 = [n for n in weights if _is_fp16(n)]
    plain = [n for n in weights if not _is_fp16(n)]
    chosen = (fp16 or plain) if prefer_fp16 else (plain or fp16)
    safetensors = [n for n in chosen if n.endswith(".safetensors")]
    return safetensors or chosen


def _is_fp16(name: str) -> bool:
    return ".fp16" in name


# ----------------------------------------------------------------------------- diffusers folders


def _load_diffusers_folder(root: Path, dtype: torch.dtype, hint: str) -> Zero123Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    prefer_fp16 = dtype == torch.float16
    index = _read_json(root / "model_index.json") or {}
    projection_folder = _projection_folder(root, index)
    wanted = {"unet": root / "unet", "vae": root / "vae", "image_encoder": root / "image_encoder"}
    missing = [name for name, folder in wanted.items() if not _has_weights(folder)]
    if projection_folder is None or not _has_weights(projection_folder):
        missing.append("camera projection (cc_projection/ or clip_camera_projection/)")
    if missing:
        raise MissingWeights(f"Zero123 weights in {root} are incomplete: missing {', '.join(missing)}; {hint}")

    try:
        unet = UNet2DConditionModel.from_pretrained(str(wanted["unet"]), torch_dtype=dtype, **_file_choice(wanted["unet"], prefer_fp16))
        vae = AutoencoderKL.from_pretrained(str(wanted["vae"]), torch_dtype=dtype, **_file_choice(wanted["vae"], prefer_fp16))
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            str(wanted["image_encoder"]), dtype=dtype, weights_only=True, **_file_choice(wanted["image_encoder"], prefer_fp16)
        )
        projection = _load_projection(projection_folder, prefer_fp16)
    except MissingWeights:
        raise
    except Exception as error:  # truncated downloads, git-lfs pointers, mismatched configs
        raise MissingWeights(f"cannot load Zero123 weights from {root}: {one_line(error)}; {hint}") from error

    mean, std, size = _clip_normalisation(root / "feature_extractor" / "preprocessor_config.json")
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json") or {}
    return Zero123Components(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        projection=projection,
        clip_mean=mean,
        clip_std=std,
        clip_size=size,
        alphas_cumprod=_alphas_cumprod_from_scheduler(scheduler_config),
        scheduler_config=scheduler_config,
    )


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def _projection_folder(root: Path, index: dict) -> Optional[Path]:
    for name in PROJECTION_FOLDERS:
        if (root / name).is_dir():
            return root / name
    # an unusual name: whatever model_index.json lists as some kind of "projection"
    for name, value in index.items():
        if isinstance(value, list) and "projection" in name.lower() and (root / name).is_dir():
            return root / name
    return None


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir())


def _file_choice(folder: Path, prefer_fp16: bool) -> dict:
    """from_pretrained arguments that read the files _pick_weight_files picks (variant and format)."""
    chosen = _pick_weight_files([p.name for p in folder.iterdir()], prefer_fp16)
    return {
        "variant": "fp16" if all(_is_fp16(n) for n in chosen) else None,
        "use_safetensors": all(n.endswith(".safetensors") for n in chosen),
    }


def _load_projection(folder: Path, prefer_fp16: bool) -> nn.Linear:
    """The camera projection as a plain Linear, whatever its class and parameter names were."""
    files = _pick_weight_files([p.name for p in folder.iterdir()], prefer_fp16)
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_read_weights(folder / name))
    matrices = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() == 2}
    if len(matrices) != 1:
        raise MissingWeights(f"{folder} should hold one linear layer, found weights {sorted(state)}")
    key, weight = next(iter(matrices.items()))
    bias = state.get(key[: -len("weight")] + "bias")
    _check_projection_config(folder, weight)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        if bias is not None:
            linear.bias.copy_(bias.float())
    return linear


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _check_projection_config(folder: Path, weight: torch.Tensor) -> None:
    """The two known configs describe the layer differently; neither may contradict the weights."""
    config = _read_json(folder / "config.json") or {}
    declared = None
    if "in_channel" in config and "out_channel" in config:  # CCProjection
        declared = (config["out_channel"], config["in_channel"])
    elif "embedding_dim" in config:  # CLIPCameraProjection: embedding + pose -> embedding
        declared = (config["embedding_dim"], config["embedding_dim"] + config.get("additional_embeddings", 4))
    if declared is not None and tuple(declared) != tuple(weight.shape):
        raise MissingWeights(f"{folder}: config says {declared[1]}->{declared[0]} but the weight is {tuple(weight.shape)}")


def _clip_normalisation(path: Path) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """(mean, std, input size) from a CLIPImageProcessor config (OpenAI CLIP's when absent)."""
    config = _read_json(path) or {}
    crop = config.get("crop_size", 224)
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge", 224))
    mean = tuple(float(v) for v in config.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in config.get("image_std", OPENAI_CLIP_STD))
    return mean, std, int(crop)


def _alphas_cumprod_from_scheduler(config: dict) -> torch.Tensor:
    if not config:
        return scaled_linear_alphas_cumprod()
    from diffusers import DDPMScheduler

    # only the beta schedule matters for SDS, whatever sampler class the repo named
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    scheduler = DDPMScheduler(**{k: config[k] for k in keys if k in config})
    return scheduler.alphas_cumprod.float().clone()


# ----------------------------------------------------------------------------- original checkpoints


def _load_checkpoint(path: Path, dtype: torch.dtype) -> Zero123Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from recon.prior import ckpt_conversion  # imports diffusers' converters: only when needed

    try:
        state = ckpt_conversion.read_checkpoint(path)
    except Exception as error:
        raise MissingWeights(f"cannot read Zero123 checkpoint {path}: {one_line(error)}; {CKPT_HINT}") from error
    missing = [part for part, present in ckpt_conversion.has_zero123_keys(state).items() if not present]
    if missing:
        raise MissingWeights(f"{path} is not a Zero123 checkpoint: missing {', '.join(missing)}; {CKPT_HINT}")

    unet_config, unet_state = ckpt_conversion.convert_unet(state)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(unet_state, strict=True)

    vae_config, vae_state = ckpt_conversion.convert_vae(state)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(vae_state, strict=True)

    clip_config, clip_state = ckpt_conversion.convert_clip_vision(state)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config))
    image_encoder.load_state_dict(clip_state, strict=True)

    weight, bias = ckpt_conversion.convert_projection(state)
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        projection.weight.copy_(weight.float())
        if bias is not None:
            projection.bias.copy_(bias.float())

    alphas = ckpt_conversion.alphas_cumprod(state)
    return Zero123Components(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        projection=projection,
        clip_size=clip_config["image_size"],
        alphas_cumprod=alphas if alphas is not None else scaled_linear_alphas_cumprod(),
        scheduler_config={"prediction_type": "epsilon", "from": "checkpoint buffers" if alphas is not None else "default"},
    )


def _check_consistent(components: Zero123Components, source: str) -> None:
    """The pieces must fit together the way Zero123 wires them."""
    unet, vae = components.unet.config, components.vae.config
    clip_dim = components.image_encoder.config.projection_dim if components.image_encoder is not None else None
    problems = []
    if unet.in_channels != 2 * vae.latent_channels:
        problems.append(f"UNet takes {unet.in_channels} channels, not 2 x {vae.latent_channels} latent channels")
    if components.projection.out_features != unet.cross_attention_dim:
        problems.append(f"projection gives {components.projection.out_features}, UNet attends to {unet.cross_attention_dim}")
    if clip_dim is not None and components.projection.in_features != clip_dim + 4:
        problems.append(f"projection takes {components.projection.in_features}, not CLIP {clip_dim} + 4 pose values")
    if problems:
        raise MissingWeights(f"{source} does not look like a Zero123 model: {'; '.join(problems)}")
