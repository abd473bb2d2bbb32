"""Where model weights come from: a local path or a Hugging Face hub id, and the hub's cache and offline mode.

One set of rules for every model recon loads (Zero123, the safety checker):
a name is a path when it exists on disk or is written like one; otherwise it
is a hub id (``name`` or ``owner/name``). Offline mode and the cache location
are read from the environment each time they are asked for, not when
huggingface_hub was imported, so a launcher or test that sets them late is
honoured.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
_TRUE = ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    """True when ``name`` means a file or folder: it exists, or it is written as a path.

    Written as a path: absolute, starting with ``.`` or ``~``, with a backslash,
    with more than one ``/``, or ending in a weights suffix. Anything else
    (``name``, ``owner/name``) that does not exist on disk is a hub id.
    """
    return (
        Path(name).expanduser().exists()
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix in WEIGHT_SUFFIXES
    )


def offline() -> bool:
    """Whether the hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now."""
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(flag.strip().lower() in _TRUE for flag in flags)


def cache_dir() -> str:
    """The hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the library's default), read now."""
    import huggingface_hub.constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return huggingface_hub.constants.HF_HUB_CACHE


def download_command(repo_id: str) -> str:
    """How to fetch ``repo_id`` on a machine with internet access."""
    # `hf` is the current CLI; older huggingface_hub releases call it `huggingface-cli`
    return f"`hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`)"
