"""Priors: what tells the fit how unseen views should look.

Every prior implements :class:`Prior`; the fit and the pipeline know nothing
else about it. :class:`recon.prior.zero123.Zero123Prior` is the product's,
:class:`recon.prior.reference.ReferencePrior` the verification stand-in that
knows the true object.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from recon.camera import Cameras


@runtime_checkable
class Prior(Protocol):
    def sds_loss(self, images: torch.Tensor, cameras: Cameras, step: int) -> dict:
        """SDS of renders [B, H, W, 3] in [0, 1] seen from ``cameras`` at fit step ``step``.

        Returns at least ``loss_sds``, a scalar whose gradient with respect to
        ``images`` is the SDS gradient, and ``t`` (the mean timestep, for logs).
        """

    def state_dict(self) -> dict:
        """The prior's random state (its noise generator), for exact resumes."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
