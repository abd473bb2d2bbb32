"""Original Zero123 checkpoints (LDM / CompVis layout) -> diffusers and transformers state dicts.

Zero123 (105000.ckpt, 165000.ckpt), Zero123-XL and Stable Zero123 ship as one
Lightning ``.ckpt`` holding a ``LatentDiffusion`` model. Its ``state_dict`` is
laid out as

    model.diffusion_model.*            the UNet (8 input channels)       -> UNet2DConditionModel
    model_ema.*                        EMA copy of the UNet (flat names)  -> preferred when present
    first_stage_model.*                the KL autoencoder                 -> AutoencoderKL
    cond_stage_model.model.visual.*    OpenAI CLIP ViT (FrozenCLIPImageEmbedder) -> CLIPVisionModelWithProjection
    cc_projection.{weight,bias}        Linear(clip + 4 -> cross-attention dim)
    alphas_cumprod, ...                the noise schedule as buffers

UNet and VAE go through diffusers' own LDM converters; the CLIP tower and the
projection are mapped here. Every dimension is read off tensor shapes, so the
same code serves the real checkpoints and the tiny ones the tests build.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.model.visual."
PROJECTION_PREFIX = "cc_projection."

# Head counts leave no trace in weight shapes, so these two come from the models' own configs:
# Zero123's UNet uses 8 heads at every level (num_heads: 8 in sd-objaverse-finetune-c_concat-256.yaml,
# as in Stable Diffusion 1.x), and OpenAI's CLIP ViTs use 64-wide heads (heads = width // 64).
UNET_NUM_HEADS = 8
CLIP_HEAD_WIDTH = 64
# ``scale_factor`` of the Zero123 config; only stored in the checkpoint when scale_by_std was on.
DEFAULT_SCALE_FACTOR = 0.18215
# Zero123 trains and samples at 256x256.
IMAGE_SIZE = 256

# Lightning stores callback state next to the weights (older versions keyed by the callback class).
# Those entries are metadata we never read, so unknown globals from these packages are replaced by
# inert stand-ins instead of ever unpickling anything unsafe.
_METADATA_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """The flat ``state_dict`` of a ``.ckpt`` (weights_only unpickling) or a single-file ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    stand_ins = []
    while True:
        try:
            with torch.serialization.safe_globals(stand_ins):
                loaded = _torch_load(path)
            break
        except pickle.UnpicklingError as error:
            name = _metadata_global(str(error))
            if name is None or len(stand_ins) >= 32 or any(known == name for _, known in stand_ins):
                raise
            stand_ins.append((_inert_class(name), name))
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state_dict")
    return state


def _torch_load(path: Path):
    try:
        # mmap keeps a 15 GB training checkpoint (EMA, optimizer states) out of RAM
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # pre-zipfile format


def _metadata_global(message: str) -> Optional[str]:
    match = _UNSUPPORTED_GLOBAL.search(message)
    if match and match.group(1).split(".")[0] in _METADATA_PACKAGES:
        return match.group(1)
    return None


def _inert_class(full_name: str) -> type:
    """A class with no behaviour standing in for a Lightning metadata class when unpickling."""
    module, _, name = full_name.rpartition(".")
    body = {"__module__": module, "__init__": lambda self, *args, **kwargs: None, "__setstate__": lambda self, state: None}
    return type(name, (), body)


def has_zero123_keys(state: Dict[str, torch.Tensor]) -> Dict[str, bool]:
    """Which of the parts a Zero123 checkpoint needs are present."""
    return {
        "UNet (model.diffusion_model.*)": any(k.startswith(UNET_PREFIX) for k in state),
        "VAE (first_stage_model.*)": any(k.startswith(VAE_PREFIX) for k in state),
        "CLIP image encoder (cond_stage_model.model.visual.*)": any(k.startswith(CLIP_PREFIX) for k in state),
        "camera projection (cc_projection.*)": f"{PROJECTION_PREFIX}weight" in state,
    }


# ----------------------------------------------------------------------------- UNet


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _block_ids(state: Dict[str, torch.Tensor], prefix: str) -> list:
    """Sorted distinct integers N of keys ``prefix N . ...``."""
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return sorted(ids)


def ldm_unet_params(state: Dict[str, torch.Tensor]) -> dict:
    """The ``unet_config.params`` of the original YAML, rebuilt from tensor shapes."""
    unet = _strip(state, UNET_PREFIX)
    model_channels, in_channels = unet["input_blocks.0.0.weight"].shape[:2]
    input_ids = _block_ids(unet, "input_blocks.")
    downsamples = [i for i in input_ids if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downsamples) + 1
    # input block 0 is conv_in; each level has num_res_blocks blocks and all but the last a downsampler
    num_res_blocks = (len(input_ids) - 1 - len(downsamples)) // levels
    channel_mult, attention_resolutions = [], []
    context_dim, depth, linear = None, 1, False
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(unet[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        proj_in = unet.get(f"input_blocks.{first}.1.proj_in.weight")
        if proj_in is not None:
            attention_resolutions.append(2**level)  # LDM names attention levels by downsampling factor
            context_dim = unet[f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
            depth = len(_block_ids(unet, f"input_blocks.{first}.1.transformer_blocks."))
            linear = proj_in.dim() == 2  # SD 2.x style linear projection, SD 1.x / Zero123 use 1x1 convs
    return {
        "in_channels": int(in_channels),
        "out_channels": int(unet["out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "attention_resolutions": attention_resolutions,
        "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult,
        "num_heads": UNET_NUM_HEADS,
        "transformer_depth": depth,
        "context_dim": None if context_dim is None else int(context_dim),
        "use_linear_in_transformer": linear,
    }


def ldm_vae_ddconfig(state: Dict[str, torch.Tensor]) -> dict:
    """The ``first_stage_config.params.ddconfig`` of the original YAML, rebuilt from tensor shapes."""
    vae = _strip(state, VAE_PREFIX)
    ch, in_channels = vae["encoder.conv_in.weight"].shape[:2]
    levels = _block_ids(vae, "encoder.down.")
    return {
        "in_channels": int(in_channels),
        "out_ch": int(vae["decoder.conv_out.weight"].shape[0]),
        "ch": int(ch),
        "ch_mult": [vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels],
        "num_res_blocks": len(_block_ids(vae, "encoder.down.0.block.")),
        "z_channels": int(vae["decoder.conv_in.weight"].shape[1]),
    }


def _original_config(state: Dict[str, torch.Tensor]) -> dict:
    """The parts of sd-objaverse-finetune-c_concat-256.yaml that diffusers' converters read."""
    scale = state.get("scale_factor")
    return {
        "model": {
            "params": {
                "scale_factor": float(scale) if scale is not None else DEFAULT_SCALE_FACTOR,
                "unet_config": {"params": ldm_unet_params(state)},
                "first_stage_config": {"params": {"ddconfig": ldm_vae_ddconfig(state)}},
            }
        }
    }


def convert_unet(state: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(UNet2DConditionModel config, its state dict); the EMA weights when the checkpoint has them.

    The original loader copies ``model_ema`` into the model whenever ``use_ema`` (the
    default) is on, so the EMA weights are the ones Zero123 was evaluated with.
    """
    original = _original_config(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # image_size is "deprecated" but skips key sniffing
        config = create_unet_diffusers_config_from_ldm(original, state, image_size=IMAGE_SIZE)
    has_ema = sum(k.startswith(EMA_PREFIX) for k in state) > 100  # diffusers' own test for an EMA checkpoint
    converted = convert_ldm_unet_checkpoint(state, config, extract_ema=has_ema)
    return config, converted


def convert_vae(state: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(AutoencoderKL config, its state dict)."""
    original = _original_config(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_vae_diffusers_config_from_ldm(original, state, image_size=IMAGE_SIZE)
    return config, convert_ldm_vae_checkpoint(state, config)


# ----------------------------------------------------------------------------- CLIP image encoder


def convert_clip_vision(state: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(CLIPVisionConfig kwargs, CLIPVisionModelWithProjection state dict) from OpenAI CLIP ``visual.*`` keys.

    OpenAI's ``encode_image`` = ln_post(token 0) @ proj, which is exactly
    ``CLIPVisionModelWithProjection(...).image_embeds``.
    """
    visual = _strip(state, CLIP_PREFIX)
    conv1 = visual["conv1.weight"]  # [width, 3, patch, patch]
    width, patch = conv1.shape[0], conv1.shape[-1]
    n_positions = visual["positional_embedding"].shape[0]  # patches + class token
    grid = round((n_positions - 1) ** 0.5)
    layers = _block_ids(visual, "transformer.resblocks.")
    config = {
        "hidden_size": int(width),
        "intermediate_size": int(visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "projection_dim": int(visual["proj"].shape[1]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": int(width) // CLIP_HEAD_WIDTH,
        "num_channels": int(conv1.shape[1]),
        "image_size": int(grid * patch),
        "patch_size": int(patch),
        "hidden_act": "quick_gelu",  # OpenAI CLIP's activation
        "layer_norm_eps": 1e-5,  # torch LayerNorm default, as in OpenAI CLIP
    }
    out = {
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": conv1,
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],  # sic: transformers' spelling
        "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
        "vision_model.post_layernorm.weight": visual["ln_post.weight"],
        "vision_model.post_layernorm.bias": visual["ln_post.bias"],
        # OpenAI computes x @ proj, nn.Linear computes x @ W^T
        "visual_projection.weight": visual["proj"].t().contiguous(),
    }
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        # one packed in_proj holds q, k and v stacked along the output dimension
        for kind in ("weight", "bias"):
            q, k, v = visual[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q.contiguous()
            out[f"{dst}self_attn.k_proj.{kind}"] = k.contiguous()
            out[f"{dst}self_attn.v_proj.{kind}"] = v.contiguous()
        renames = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = visual[f"{src}{old}.{kind}"]
    return config, out


def convert_projection(state: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [out, in], bias [out] or None) of the camera projection."""
    return state[f"{PROJECTION_PREFIX}weight"], state.get(f"{PROJECTION_PREFIX}bias")


def alphas_cumprod(state: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """The checkpoint's own alpha_bar(t) buffer (LDM registers it), if saved."""
    value = state.get("alphas_cumprod")
    return None if value is None else value.detach().float().clone()
