"""recon: one photo of an object in, a textured 3D asset out.

``from recon import reconstruct, novel_views``: the Python API (``recon.api``),
imported on first use so that ``import recon`` stays light (no torch).
"""

__version__ = "0.1.0"

__all__ = ["reconstruct", "novel_views"]


def __getattr__(name):
    if name in __all__:
        from recon import api

        return getattr(api, name)
    raise AttributeError(f"module 'recon' has no attribute {name!r}")
