"""Zero-1-to-3 guidance: SDS gradients for renders of novel views, conditioned on the input image.

Zero123 is a Stable Diffusion UNet fine-tuned to denoise a novel view given the
input view and the relative camera pose. It is conditioned exactly as trained
(docs/design.md, "Zero123 conditioning"):

* cross-attention: ``projection(cat[CLIP(input), pose_vector])``, one token;
* concatenated to the noisy latent: the input's VAE latent, unscaled (``mode()``,
  no scaling factor), giving the UNet 8 input channels;
* classifier-free guidance with zeros for both in the unconditional branch.

The CLIP embedding and the input latent are computed once; the CLIP encoder and
the VAE decoder are then freed (renders only ever go through the VAE encoder).
The SDS maths (timesteps, noise, w(t), surrogate loss) is ``recon.prior.sds``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from recon.camera import Cameras
from recon.config import PriorConfig
from recon.errors import MissingWeights
from recon.prepare import ReferenceView
from recon.prior import sds
from recon.prior.zero123_loading import Zero123Components, load_zero123

__all__ = ["Zero123Prior", "pose_vector", "load_zero123", "Zero123Components"]


def pose_vector(elevation, azimuth, distance, cond_elevation, cond_azimuth, cond_distance, stable: bool = False) -> torch.Tensor:
    """Zero123's camera condition of target views relative to the input view; degrees in, [..., 4] out.

    ``[rad(E_c - E_t), sin(rad(A_t - A_c)), cos(rad(A_t - A_c)), d_t - d_c]``: the change
    of polar angle (polar = 90 - elevation), the azimuth change and the distance change.
    Stable Zero123 replaces the distance change by the input's absolute polar angle
    ``rad(90 - E_c)``. Arguments broadcast (tensors or numbers).
    """
    values = [elevation, azimuth, distance, cond_elevation, cond_azimuth, cond_distance]
    reference = next((v for v in values if isinstance(v, torch.Tensor)), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    e, a, d, ec, ac, dc = torch.broadcast_tensors(*[torch.as_tensor(v, dtype=dtype, device=device) for v in values])
    azimuth_change = torch.deg2rad(a - ac)
    last = torch.deg2rad(90.0 - ec) if stable else d - dc
    return torch.stack([torch.deg2rad(ec - e), torch.sin(azimuth_change), torch.cos(azimuth_change), last], dim=-1)


def _moved(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # move or cast only when needed: diffusers warns about casting models it loaded in
    # the right dtype, and the cost model's fake-tensor modules cannot be moved at all
    parameter = next(module.parameters())
    if parameter.dtype != dtype:
        module = module.to(dtype=dtype)
    return module if parameter.device == device else module.to(device)


class Zero123Prior:
    """Score distillation from Zero123 for views of the object seen in ``reference``.

    ``components`` (already loaded weights) and ``seed`` are optional extras: by
    default the weights named by ``cfg.model`` are loaded. The prior owns the
    components: it frees the CLIP encoder and the VAE decoder after conditioning.
    ``dtype`` (of the UNet and the VAE) defaults to float16 on CUDA with
    ``cfg.half_precision``, else float32; the cost model sets it to price a
    CUDA run on the CPU.
    """

    def __init__(
        self,
        cfg: PriorConfig,
        reference: ReferenceView,
        reference_camera: Cameras,
        device: torch.device,
        *,
        components: Optional[Zero123Components] = None,
        seed: int = 0,
        dtype: Optional[torch.dtype] = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        # fp16 only where it is fast and safe; CPU keeps float32 (and the same function)
        if dtype is None:
            dtype = torch.float16 if (cfg.half_precision and self.device.type == "cuda") else torch.float32
        self.dtype = dtype
        if components is None:
            components = load_zero123(cfg.model, self.device, self.dtype)
        if components.prediction_type != "epsilon":
            raise MissingWeights(f"{components.source}: predicts '{components.prediction_type}', Zero123 SDS needs epsilon")
        self.unet = _moved(components.unet, self.device, self.dtype)
        self.vae = _moved(components.vae, self.device, self.dtype)
        self.projection = _moved(components.projection, self.device, torch.float32)  # tiny: keep it exact
        self.scaling_factor = components.scaling_factor
        self.alphas_cumprod = components.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.source = components.source
        self.generator = torch.Generator().manual_seed(seed)

        camera = reference_camera.to(self.device)[0]
        self.cond_elevation = float(camera.elevation.item())
        self.cond_azimuth = float(camera.azimuth.item())
        self.cond_distance = float(camera.distance.item())

        self.clip_embedding, self.cond_latent = self._encode_reference(reference, components)
        # Conditioning is fixed for the run: drop what is no longer needed (GBs for the real model).
        components.image_encoder = None
        self.vae.decoder = None
        self.vae.post_quant_conv = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def _encode_reference(self, reference: ReferenceView, components: Zero123Components):
        """(CLIP image embedding [1, P], unscaled VAE latent [1, C, h, w]) of the input over white."""
        size = self.cfg.image_size
        rgb, _ = reference.at(size)
        image = rgb.permute(2, 0, 1)[None].to(self.device, torch.float32)  # [1, 3, S, S] in [0, 1]
        # As Zero123's FrozenCLIPImageEmbedder: bicubic resize (align_corners, no antialias), then CLIP's normalisation.
        pixels = F.interpolate(image, size=(components.clip_size, components.clip_size), mode="bicubic", align_corners=True)
        mean = torch.tensor(components.clip_mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(components.clip_std, device=self.device).view(1, -1, 1, 1)
        encoder = _moved(components.image_encoder, self.device, components.image_encoder.dtype)
        embedding = encoder(pixel_values=((pixels - mean) / std).to(encoder.dtype)).image_embeds.float()
        latent = self.vae.encode((image * 2.0 - 1.0).to(self.dtype)).latent_dist.mode().float()
        return embedding, latent

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] (with the scaling factor) of renders [B, H, W, 3] in [0, 1], differentiable."""
        x = images.permute(0, 3, 1, 2)
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x * 2.0 - 1.0).to(self.dtype)
        if self.cfg.recompute_vae and torch.is_grad_enabled() and x.requires_grad:
            # Reentrant: each image's activations are recomputed, used and freed within its own
            # backward call; the non-reentrant kind keeps recomputed tensors that the backward
            # pass never reads until the whole graph is freed, which cost more than it saved.
            latents = torch.cat([torch.utils.checkpoint.checkpoint(self._encode, image, use_reentrant=True) for image in x.split(1)])
        else:
            latents = self._encode(x)
        return latents.float() * self.scaling_factor

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # mode() rather than sample(): the SD VAE's posterior spread is negligible and the
        # latent then stays a deterministic function of the render
        return self.vae.encode(x).latent_dist.mode()

    def camera_embedding(self, cameras: Cameras) -> torch.Tensor:
        """Cross-attention tokens [B, 1, D] for the target cameras: projection(cat[clip, pose])."""
        pose = pose_vector(
            cameras.elevation,
            cameras.azimuth,
            cameras.distance,
            self.cond_elevation,
            self.cond_azimuth,
            self.cond_distance,
            stable=self.cfg.stable,
        ).to(self.device, torch.float32)
        clip = self.clip_embedding.expand(pose.shape[0], -1)
        return self.projection(torch.cat([clip, pose], dim=-1))[:, None, :]

    @torch.no_grad()
    def predict_noise(self, noisy_latents: torch.Tensor, t: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """Classifier-free guided noise prediction [B, C, h, w] (float32).

        One UNet call on [unconditional; conditional]: the unconditional half gets zeros
        for both the image latent and the cross-attention token, as Zero123 was trained.
        """
        batch = noisy_latents.shape[0]
        embedding = self.camera_embedding(cameras)
        cond_latent = self.cond_latent.expand(batch, -1, -1, -1)
        sample = torch.cat(
            [torch.cat([noisy_latents, torch.zeros_like(cond_latent)], dim=1), torch.cat([noisy_latents, cond_latent], dim=1)]
        )
        tokens = torch.cat([torch.zeros_like(embedding), embedding])
        timesteps = torch.cat([t, t]).to(self.device)
        eps = self.unet(sample.to(self.dtype), timesteps, encoder_hidden_states=tokens.to(self.dtype), return_dict=False)[0]
        eps_uncond, eps_cond = eps.float().chunk(2)
        return eps_uncond + self.cfg.guidance_scale * (eps_cond - eps_uncond)

    def sds_loss(
        self,
        images: torch.Tensor,
        cameras: Cameras,
        step: int,
        *,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        stats: bool = True,
    ) -> dict:
        """SDS loss of renders [B, H, W, 3] in [0, 1] seen from ``cameras``.

        ``t`` and ``noise`` are drawn here (annealed range, the prior's generator)
        unless given, which tests use to check the gradient by hand. ``stats``
        adds the mean timestep and gradient norm as floats, which read values
        back from the device (the cost model's fake tensors have none).
        """
        cameras = cameras.to(self.device)
        latents = self.encode_images(images)
        batch = latents.shape[0]
        t_range = sds.timestep_range(self.cfg, step)
        if t is None:
            t = sds.sample_timesteps(batch, t_range, self.num_train_timesteps, generator=self.generator, device=self.device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=self.generator)
        t = t.to(self.device)
        noise = noise.to(self.device, torch.float32)
        alpha_bar = self.alphas_cumprod[t]
        with torch.no_grad():
            noisy = sds.add_noise(latents.detach(), noise, alpha_bar)
            eps = self.predict_noise(noisy, t, cameras)
            grad = sds.sds_gradient(eps, noise, alpha_bar, self.cfg.grad_clip)
        out = {"loss_sds": sds.sds_surrogate_loss(latents, grad), "t_min": t_range[0], "t_max": t_range[1]}
        if stats:
            out["t"] = t.float().mean().item()
            out["grad_norm"] = grad.flatten(1).norm(dim=1).mean().item()
        return out
