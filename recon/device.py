"""Which device a run uses."""

from __future__ import annotations

import torch

from recon.errors import BadInput

DEVICES = ("auto", "cpu", "cuda")


def choose_device(name: str) -> torch.device:
    """``auto``: CUDA when PyTorch sees a GPU, else the CPU; ``cuda`` without a GPU is a usage error."""
    if name not in DEVICES:
        raise BadInput(f"unknown device '{name}' (use {', '.join(DEVICES)})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA GPU is visible to PyTorch")
    return torch.device(name)
