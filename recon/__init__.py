"""recon: one photo of an object in, a textured 3D asset out."""

__version__ = "0.1.0"
