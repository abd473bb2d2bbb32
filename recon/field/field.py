"""The radiance field: density and albedo from a hash-grid encoding.

Density is what the volume renderer and marching cubes read; albedo is the
(unlit) colour, which is what the texture baker reads too, so the exported mesh
shows exactly the colours the field renders.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon.config import FieldConfig
from recon.field.hash_grid import make_hash_grid


class _TruncExp(torch.autograd.Function):
    """exp() whose backward clamps its input, so a large density cannot blow up the gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def mlp(n_in: int, n_hidden: int, n_layers: int, n_out: int) -> nn.Sequential:
    layers, width = [], n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, n_hidden), nn.ReLU(inplace=True)]
        width = n_hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class RadianceField(nn.Module):
    """Density and albedo inside the box [-radius, radius]^3; zero density outside."""

    def __init__(self, cfg: FieldConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.radius = float(cfg.radius)
        self.encoding = make_hash_grid(cfg, torch.device(device or "cpu"))
        # One small MLP for both heads: the hash grid carries the detail, the
        # MLP only decodes it, and a shared trunk halves the per-sample cost.
        self.decoder = mlp(self.encoding.n_output_dims, cfg.hidden_dim, cfg.n_hidden_layers, 4).to(device)

    def density_bias(self, points: torch.Tensor) -> torch.Tensor:
        """Blob prior (Magic3D-style): high density at the centre, falling off with distance.

        Added before the activation, it makes the untrained field a soft ball
        that SDS can shape, instead of empty space that gives no gradient.
        """
        distance = points.norm(dim=-1)
        return self.cfg.density_bias_scale * (1.0 - distance / self.cfg.density_bias_radius)

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """Hash-grid features [P, F] (float32) of world points [P, 3]; points outside the box are clamped to it."""
        return self.encoding(self._unit(points).clamp(0.0, 1.0))

    def encode_again(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``encode(points)`` for features [P, F] already computed without gradients: the same values, now
        differentiable in the grid's table.

        Saves the second encoding of the samples that survive the early stop
        where the encoding supports it (the fused CPU kernels); elsewhere it
        encodes again.
        """
        reattach = getattr(self.encoding, "reattach", None)
        unit = self._unit(points).clamp(0.0, 1.0)
        return reattach(features, unit) if reattach is not None else self.encoding(unit)

    def decode(self, features: torch.Tensor, points: torch.Tensor):
        """(density [P], albedo [P, 3]) from features [P, F] of world points [P, 3]."""
        out = self.decoder(features.float())
        unit = self._unit(points)
        inside = ((unit >= 0.0) & (unit <= 1.0)).all(dim=-1)
        density = trunc_exp(out[..., 0] + self.density_bias(points)) * inside
        return density, torch.sigmoid(out[..., 1:4])

    def _unit(self, points: torch.Tensor) -> torch.Tensor:
        return (points / self.radius + 1.0) * 0.5

    def forward(self, points: torch.Tensor):
        """(density [P], albedo [P, 3]) at world points [P, 3]."""
        return self.decode(self.encode(points), points)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points)[0]

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.forward(points)[1]

    def density_and_normal(self, points: torch.Tensor, create_graph: bool = False):
        """(density [P], albedo [P, 3], outward normal [P, 3]) with normals = -grad(density) normalised."""
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            density, albedo = self.forward(points)
            grad = torch.autograd.grad(density.sum(), points, create_graph=create_graph)[0]
        normal = F.normalize(-grad, dim=-1, eps=1e-8)
        return density, albedo, normal
