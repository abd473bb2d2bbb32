"""Image in: decode, validate, cut out the object, recentre, resize.

Produces the :class:`ReferenceView` that the fit and the prior condition on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ReferenceView:
    """The input view as straight-alpha RGBA, square, object centred."""

    rgba: torch.Tensor  # [S, S, 4] float32 in [0, 1]

    def at(self, resolution: int, background=(1.0, 1.0, 1.0)):
        """(rgb over ``background`` [r, r, 3], alpha [r, r, 1]) resized with area averaging."""
        rgba = self.rgba
        if rgba.shape[0] != resolution:
            # average premultiplied colour so that edges do not bleed the background in
            premultiplied = torch.cat([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], dim=-1)
            resized = F.interpolate(premultiplied.permute(2, 0, 1)[None], size=(resolution, resolution), mode="area")[0].permute(1, 2, 0)
            alpha = resized[..., 3:]
            colour = resized[..., :3]
        else:
            alpha = rgba[..., 3:]
            colour = rgba[..., :3] * alpha
        bg = torch.as_tensor(background, dtype=rgba.dtype, device=rgba.device)
        return colour + (1.0 - alpha) * bg, alpha
