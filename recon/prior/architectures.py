"""Zero123's module shapes, and a randomly initialised Zero123 built from them.

No weights are needed to time or to price the real architecture: the shapes
alone fix the FLOPs and the memory. ``FULL`` is Zero123-XL's (Stable Zero123
has the same modules); ``TINY`` is a stand-in small enough for a CPU.
"""

from __future__ import annotations

from typing import Dict

import torch

from recon.prior.zero123_loading import Zero123Components

# Zero123-XL: the SD 1.x UNet (diffusers' defaults) with the input latent concatenated.
FULL = {
    "unet": dict(sample_size=32, in_channels=8, out_channels=4, cross_attention_dim=768),  # other defaults = SD 1.x
    "vae": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    ),
    "clip": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
}
TINY = {
    "unet": dict(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    "vae": dict(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    ),
    "clip": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    ),
}


def random_components(shapes: Dict[str, dict], device: torch.device, dtype: torch.dtype = torch.float32) -> Zero123Components:
    """A randomly initialised Zero123 with the given shapes, built directly on ``device``.

    The UNet, VAE and CLIP encoder are built in ``dtype`` (the projection stays
    float32, as the prior keeps it): building in place rather than casting
    afterwards is what lets the cost model build them as fake tensors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialise on the GPU: building 1.3 B parameters on a CPU takes minutes
            unet = UNet2DConditionModel(**shapes["unet"])
            vae = AutoencoderKL(**shapes["vae"])
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**shapes["clip"]))
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        projection = torch.nn.Linear(shapes["clip"]["projection_dim"] + 4, unet.config.cross_attention_dim)
    for module in (unet, vae, image_encoder, projection):
        module.eval().requires_grad_(False)
    return Zero123Components(
        unet=unet, vae=vae, image_encoder=image_encoder, projection=projection, clip_size=shapes["clip"]["image_size"], source="random init"
    )
