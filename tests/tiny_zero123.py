"""Tiny, randomly initialised Zero123 models saved in the real on-disk layouts.

``build_tiny_zero123(path, layout=...)`` writes one of the layouts Zero123
weights come in, built from the real diffusers / transformers classes, so that
tests load them through the same public loader (``load_zero123``) as the real
weights. Dimensions are deliberately unlike the real model (CLIP embedding 40,
not 768; CLIP input 32, not 224) so that anything hard-coded shows up.

Layouts:

* ``cc_projection``: diffusers folder, projection in ``cc_projection/`` (kxic's
  ``CCProjection``: parameter ``projection``, config without dimensions);
* ``clip_camera_projection``: diffusers folder, projection in
  ``clip_camera_projection/`` (ashawkey's ``CLIPCameraProjection``: parameter
  ``proj``, config ``embedding_dim`` / ``additional_embeddings``);
* ``fp16``: like ``cc_projection`` but only ``*.fp16.safetensors`` files;
* ``bin``: like ``clip_camera_projection`` but pickled ``.bin`` files;
* ``ckpt``: an original Lightning checkpoint (``state_dict`` in LDM key layout,
  EMA weights, Lightning callback metadata keyed by a class).
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

# Dimensions of the tiny model (the real Zero123: 768, 768, 224, (320, 640, 1280, 1280)).
CLIP_DIM = 40  # CLIP projection_dim = UNet cross-attention dim
CLIP_WIDTH = 64  # one 64-wide head, as OpenAI CLIP sizes its heads
CLIP_IMAGE = 32
LATENT_CHANNELS = 4
TIMESTEPS = 1000
LAYOUTS = ("cc_projection", "clip_camera_projection", "fp16", "bin", "ckpt")
# A schedule unlike Zero123's, so a test can tell that the checkpoint's own schedule was used.
SCHEDULE = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": TIMESTEPS}


def make_tiny_modules(seed: int = 0) -> Dict[str, nn.Module]:
    """The four networks of a tiny Zero123, deterministic in ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_DIM,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),  # LDM's GroupNorm has 32 groups, so widths are multiples of 32
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=CLIP_WIDTH,
            intermediate_size=2 * CLIP_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=CLIP_WIDTH // 64,
            image_size=CLIP_IMAGE,
            patch_size=8,
            projection_dim=CLIP_DIM,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
    )
    projection = nn.Linear(CLIP_DIM + 4, CLIP_DIM)
    # random init leaves some tensors at exactly zero or one (norms, biases); make every
    # tensor distinctive so that a wrong mapping cannot pass a comparison by luck
    for module in (unet, vae, image_encoder, projection):
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        module.eval()
    return {"unet": unet, "vae": vae, "image_encoder": image_encoder, "projection": projection}


def build_tiny_zero123(path, layout: str = "cc_projection", seed: int = 0, modules: Optional[Dict[str, nn.Module]] = None) -> Path:
    """Write a tiny Zero123 in ``layout`` under ``path``; returns what to pass as ``prior.model``.

    ``modules`` (from :func:`make_tiny_modules`, left unchanged) saves building them again.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = modules if modules is not None else make_tiny_modules(seed)
    if layout == "ckpt":
        target = path / "tiny_zero123.ckpt"
        _save_ckpt(modules, target)
        return target
    projection_folder = "clip_camera_projection" if layout in ("clip_camera_projection", "bin") else "cc_projection"
    _save_diffusers(modules, path, projection_folder, fp16=layout == "fp16", pickled=layout == "bin")
    return path


# ----------------------------------------------------------------------------- diffusers folders


def _save_diffusers(modules, root: Path, projection_folder: str, fp16: bool, pickled: bool) -> None:
    from diffusers import DDIMScheduler

    variant = "fp16" if fp16 else None
    for name in ("unet", "vae"):
        module = copy.deepcopy(modules[name]).half() if fp16 else modules[name]
        module.save_pretrained(root / name, safe_serialization=not pickled, variant=variant)
    _save_image_encoder(modules["image_encoder"], root / "image_encoder", fp16, pickled)
    _save_projection(modules["projection"], root / projection_folder, fp16, pickled)
    DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SCHEDULE).save_pretrained(root / "scheduler")
    _write_json(root / "feature_extractor" / "preprocessor_config.json", _preprocessor_config())
    pipeline_class, projection_class = (
        ("Zero1to3StableDiffusionPipeline", ["pipeline_zero1to3", "CCProjection"])
        if projection_folder == "cc_projection"
        else ("Zero123Pipeline", ["zero123", "CLIPCameraProjection"])
    )
    _write_json(
        root / "model_index.json",
        {
            "_class_name": pipeline_class,
            "_diffusers_version": "0.19.3",
            projection_folder: projection_class,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "requires_safety_checker": True,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _save_image_encoder(model, folder: Path, fp16: bool, pickled: bool) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fp16:
        state = {k: v.half() for k, v in state.items()}
    if pickled:
        torch.save(state, folder / "pytorch_model.bin")  # transformers' .bin name
    else:
        save_file(state, str(folder / ("model.fp16.safetensors" if fp16 else "model.safetensors")), metadata={"format": "pt"})


def _save_projection(linear: nn.Linear, folder: Path, fp16: bool, pickled: bool) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if folder.name == "cc_projection":
        # CCProjection does not register its arguments, so its config carries no sizes
        prefix, config = "projection", {"_class_name": "CCProjection", "_diffusers_version": "0.19.3"}
    else:
        prefix = "proj"
        config = {
            "_class_name": "CLIPCameraProjection",
            "_diffusers_version": "0.19.3",
            "embedding_dim": linear.out_features,
            "additional_embeddings": linear.in_features - linear.out_features,
        }
    _write_json(folder / "config.json", config)
    state = {f"{prefix}.weight": linear.weight.detach().clone(), f"{prefix}.bias": linear.bias.detach().clone()}
    if fp16:
        state = {k: v.half() for k, v in state.items()}
    if pickled:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(state, str(folder / ("diffusion_pytorch_model.fp16.safetensors" if fp16 else "diffusion_pytorch_model.safetensors")))


def _preprocessor_config() -> dict:
    return {
        "crop_size": {"height": CLIP_IMAGE, "width": CLIP_IMAGE},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.5, 0.25, 0.125],  # not OpenAI's, so a test can see where the values came from
        "image_std": [0.2, 0.4, 0.8],
        "resample": 3,
        "size": {"shortest_edge": CLIP_IMAGE},
    }


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------- original checkpoints

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(unet) -> Dict[str, torch.Tensor]:
    """A diffusers UNet's state dict under the original openaimodel.UNetModel names."""
    n = unet.config.layers_per_block
    blocks_per_level = n + 1
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "conv_in":
            new = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }.{parts[2]}"
        elif parts[0] == "conv_norm_out":
            new = f"out.0.{parts[1]}"
        elif parts[0] == "conv_out":
            new = f"out.2.{parts[1]}"
        elif parts[0] == "down_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers":  # the block after the level's resnets
                new = f"input_blocks.{(level + 1) * blocks_per_level}.0.op.{rest[-1]}"
            else:
                block = 1 + level * blocks_per_level + index
                new = f"input_blocks.{block}.{_ldm_tail(kind, rest)}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            block = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, index)]
            new = f"middle_block.{block}.{_ldm_tail(kind, rest)[2:]}"
        elif parts[0] == "up_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "upsamplers":  # sits after the resnet (.0) and, in attention levels, the attention (.1)
                block = level * blocks_per_level + n
                slot = 2 if getattr(unet.up_blocks[level], "attentions", None) else 1
                new = f"output_blocks.{block}.{slot}.conv.{rest[-1]}"
            else:
                new = f"output_blocks.{level * blocks_per_level + index}.{_ldm_tail(kind, rest)}"
        else:
            raise KeyError(key)
        out[new] = value.detach().clone()
    return out


def _ldm_tail(kind: str, rest) -> str:
    """'0.<resnet names>' or '1.<attention names>' inside one LDM block."""
    if kind == "resnets":
        return "0." + ".".join([_RESNET_TO_LDM.get(rest[0], rest[0])] + list(rest[1:]))
    return "1." + ".".join(rest)


def vae_to_ldm(vae) -> Dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict under the original ldm autoencoder names."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        value = value.detach().clone()
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if len(parts) > 2 and parts[1] == "down_blocks":
            if parts[3] == "downsamplers":
                new = f"encoder.down.{parts[2]}.downsample.conv.{parts[-1]}"
            else:
                new = f"encoder.down.{parts[2]}.block.{parts[4]}.{'.'.join(parts[5:])}"
        elif len(parts) > 2 and parts[1] == "up_blocks":
            level = levels - 1 - int(parts[2])  # LDM numbers decoder levels from the lowest resolution up
            if parts[3] == "upsamplers":
                new = f"decoder.up.{level}.upsample.conv.{parts[-1]}"
            else:
                new = f"decoder.up.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
                new = f"{parts[0]}.mid.attn_1.{names[parts[4]]}.{parts[-1]}"
                if value.dim() == 2:  # LDM's attention uses 1x1 convolutions
                    value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


def clip_to_openai(image_encoder) -> Dict[str, torch.Tensor]:
    """A CLIPVisionModelWithProjection's state dict under OpenAI CLIP's ``visual.*`` names."""
    state = image_encoder.state_dict()
    layers = image_encoder.config.num_hidden_layers
    out = {
        "class_embedding": state["vision_model.embeddings.class_embedding"],
        "conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "ln_post.weight": state["vision_model.post_layernorm.weight"],
        "ln_post.bias": state["vision_model.post_layernorm.bias"],
        "proj": state["visual_projection.weight"].t(),
    }
    for i in range(layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def ldm_state_dict(modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of a Zero123 LatentDiffusion holding ``modules``.

    The UNet's EMA copy (``model_ema.*``, LitEma's dot-free names) holds the real
    weights; the raw weights under ``model.diffusion_model.*`` are shifted, as
    training weights differ from their average, so a loader that ignored the EMA
    would be caught.
    """
    from diffusers import DDPMScheduler

    state = {}
    for key, value in unet_to_ldm(modules["unet"]).items():
        state[f"model.diffusion_model.{key}"] = value + 0.5
        state["model_ema." + ("diffusion_model." + key).replace(".", "")] = value
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(105000, dtype=torch.int32)
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(modules["vae"]).items()})
    state.update({f"cond_stage_model.model.visual.{k}": v for k, v in clip_to_openai(modules["image_encoder"]).items()})
    # the text tower's leftovers that FrozenCLIPImageEmbedder does not delete
    state["cond_stage_model.model.positional_embedding"] = torch.randn(77, CLIP_WIDTH)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    state["cc_projection.weight"] = modules["projection"].weight.detach().clone()
    state["cc_projection.bias"] = modules["projection"].bias.detach().clone()
    schedule = DDPMScheduler(**SCHEDULE)
    state["betas"] = schedule.betas.clone()
    state["alphas_cumprod"] = schedule.alphas_cumprod.clone()
    return state


def _save_ckpt(modules, target: Path) -> None:
    # Old Lightning versions key callback state by the callback class itself, so a real
    # checkpoint holds a reference to a pytorch_lightning class next to the weights.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {name: sys.modules.get(name) for name in names}
    fake = {name: types.ModuleType(name) for name in names}
    callback_class = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fake[names[-1]].ModelCheckpoint = callback_class
    try:
        sys.modules.update(fake)
        checkpoint = {
            "epoch": 3,
            "global_step": 105000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": ldm_state_dict(modules),
            "callbacks": {callback_class: {"best_model_score": None, "dirpath": "logs/checkpoints"}},
            "optimizer_states": [],
            "lr_schedulers": [],
        }
        torch.save(checkpoint, str(target))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
