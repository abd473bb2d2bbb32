"""Safety gate: the Stable Diffusion safety checker on every input image.

The checker is a CLIP ViT image encoder plus a fixed set of concept
embeddings, each with its own cosine-similarity threshold. An image is
flagged when its embedding is closer to any concept than that concept's
threshold allows. We compute the decision here from the checker's tensors
rather than calling its ``forward`` so that the thresholds can be scaled
(``threshold_scale``; the public Zero123 demo uses 1.07 to cut false
positives on harmless objects) and so that the margins can be reported.

The gate fails closed: weights that cannot be found or loaded raise
:class:`~recon.errors.MissingWeights`, never a silent pass.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from recon import hub
from recon.errors import MissingWeights, Refused, one_line

log = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-safety-checker"

REFUSAL = "the safety checker flagged this image; nothing was processed (see the Zero123 model card's use restrictions)"

# When a "special care" concept is close, diffusers' checker lowers every
# concept threshold by this much (makes the main test stricter).
SPECIAL_CARE_ADJUSTMENT = 0.01


@dataclass
class SafetyVerdict:
    """Outcome of one check. Scores are margins: above zero means the concept fired."""

    flagged: bool
    concept_scores: List[float]  # cos_sim - threshold * scale (+ special-care adjustment), per concept
    special_scores: List[float]  # cos_sim - threshold * scale, per special-care concept
    threshold_scale: float
    model: str

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_if_flagged(self) -> None:
        """Raise :class:`~recon.errors.Refused` (exit code 3) when the image was flagged."""
        if self.flagged:
            raise Refused(REFUSAL)


class SafetyGate:
    """A loaded safety checker; :meth:`check` gives the verdict on one image."""

    def __init__(self, checker, processor, model: str, device, threshold_scale: float = 1.0, max_side: int = 1536):
        self.checker = checker
        self.processor = processor
        self.model = model
        self.device = torch.device(device)
        self.threshold_scale = float(threshold_scale)
        self.max_side = int(max_side)

    @torch.no_grad()
    def check(self, image: Image.Image) -> SafetyVerdict:
        """Verdict on the raw image (before any cropping), downscaled to ``max_side`` at most.

        An image with transparency is checked twice, as stored (colour with the
        alpha dropped) and composited on white (what the pipeline sees), and is
        flagged if either view is: content hidden behind alpha or drawn by
        alpha alone must not slip through.
        """
        views = _views_to_check(_downscale(image, self.max_side))
        pixels = self.processor(images=views, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.checker.visual_projection.weight.dtype)

        pooled = self.checker.vision_model(pixels).pooler_output
        embeds = self.checker.visual_projection(pooled)
        special, concept = verdict_margins(
            embeds,
            self.checker.concept_embeds,
            self.checker.concept_embeds_weights,
            self.checker.special_care_embeds,
            self.checker.special_care_embeds_weights,
            self.threshold_scale,
        )
        # worst case over the views, concept by concept
        special = special.amax(dim=0)
        concept = concept.amax(dim=0)
        return SafetyVerdict(
            flagged=bool((concept > 0).any()),
            concept_scores=concept.tolist(),
            special_scores=special.tolist(),
            threshold_scale=self.threshold_scale,
            model=self.model,
        )


def verdict_margins(
    image_embeds: torch.Tensor,
    concept_embeds: torch.Tensor,
    concept_thresholds: torch.Tensor,
    special_embeds: torch.Tensor,
    special_thresholds: torch.Tensor,
    threshold_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(special [B, n_special], concept [B, n_concepts]) margins; an image is flagged if any concept margin > 0.

    Same decision as diffusers' StableDiffusionSafetyChecker at ``threshold_scale=1``
    (without its rounding of the scores to three decimals).
    """
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    special_cos = image_embeds @ F.normalize(special_embeds.float(), dim=-1).T
    concept_cos = image_embeds @ F.normalize(concept_embeds.float(), dim=-1).T

    special = special_cos - threshold_scale * special_thresholds.float()
    special_care = (special > 0).any(dim=1, keepdim=True)
    concept = concept_cos - threshold_scale * concept_thresholds.float() + SPECIAL_CARE_ADJUSTMENT * special_care
    return special, concept


def load_safety_gate(model: str, device, threshold_scale: float = 1.0, max_side: int = 1536) -> SafetyGate:
    """Load the checker and its CLIP preprocessor from a hub id or a local directory.

    A hub id is looked up in the Hugging Face cache first; it is downloaded only
    when the cache misses and offline mode (``HF_HUB_OFFLINE=1``) is off. A local
    directory holds either the checker's own layout (``config.json``, weights,
    ``preprocessor_config.json``) or a Stable Diffusion pipeline's
    (``safety_checker/`` and ``feature_extractor/``). Anything that prevents
    loading raises :class:`~recon.errors.MissingWeights`.
    """
    # imported here: diffusers takes seconds to import and the CLI validates its input first
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    local = _local_directory(model)
    if local is None and hub.looks_like_path(model):
        raise MissingWeights(f"safety checker not found: {model} is not a directory. {_how_to_get(model)}")
    source = local if local is not None else model
    checker_kwargs, processor_kwargs = {}, {}
    if local is not None and (local / "safety_checker").is_dir():  # a whole Stable Diffusion pipeline folder
        checker_kwargs, processor_kwargs = {"subfolder": "safety_checker"}, {"subfolder": "feature_extractor"}

    try:
        checker, info = _from_pretrained(
            StableDiffusionSafetyChecker, source, local is not None, output_loading_info=True, **checker_kwargs
        )
        processor = _from_pretrained(CLIPImageProcessor, source, local is not None, **processor_kwargs)
    except Exception as error:  # OSError, ValueError, safetensors/JSON/pickle errors: all mean "no usable weights"
        raise MissingWeights(
            f"cannot load the safety checker from {_describe(model, local)}: {one_line(error)}. {_how_to_get(model)}"
        ) from error

    # A checkpoint without the concept tensors would keep their placeholder values and judge nothing.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise MissingWeights(
            f"the safety checker at {_describe(model, local)} is incomplete (missing {', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}). {_how_to_get(model)}"
        )

    checker = checker.to(device=torch.device(device), dtype=torch.float32).eval()
    log.info("safety checker loaded from %s (threshold scale %.3g)", _describe(model, local), threshold_scale)
    return SafetyGate(checker, processor, model, device, threshold_scale=threshold_scale, max_side=max_side)


def gate_from_config(cfg, device) -> SafetyGate:
    """The checker named by ``cfg`` (a GateConfig), with its threshold scale and size limit."""
    return load_safety_gate(cfg.model, device, threshold_scale=cfg.threshold_scale, max_side=cfg.max_side)


def gate_image(image: Image.Image, cfg, device) -> SafetyVerdict:
    """Load the checker named by ``cfg`` (a GateConfig), judge ``image``, free the checker: the verdict."""
    gate = gate_from_config(cfg, device)
    try:
        return gate.check(image)
    finally:
        del gate


def _from_pretrained(cls, source, is_local: bool, **kwargs):
    """Cache (or local directory) first; the network only when allowed and needed."""
    if is_local:
        return cls.from_pretrained(str(source), local_files_only=True, **kwargs)
    cache_dir = hub.cache_dir()
    try:
        return cls.from_pretrained(source, local_files_only=True, cache_dir=cache_dir, **kwargs)
    except OSError:
        if hub.offline():
            raise
    return cls.from_pretrained(source, local_files_only=False, cache_dir=cache_dir, **kwargs)


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA")
    longest = max(image.size)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # Pillow resizes RGBA with premultiplied alpha, so transparent colour does not bleed
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _views_to_check(image: Image.Image) -> List[Image.Image]:
    if image.mode != "RGBA" or image.getchannel("A").getextrema()[0] == 255:
        return [image.convert("RGB")]
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return [image.convert("RGB"), on_white.convert("RGB")]


def _local_directory(model: str) -> Optional[Path]:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _describe(model: str, local: Optional[Path]) -> str:
    if local is not None:
        return f"directory {local}"
    return f"'{model}' (Hugging Face cache {hub.cache_dir()}{', offline' if hub.offline() else ''})"


def _how_to_get(model: str) -> str:
    hub_id = model if not hub.looks_like_path(model) else DEFAULT_MODEL
    return (
        f"Download the weights with {hub.download_command(hub_id)} "
        "on a machine with internet access, or set gate.model=/path/to/dir to a directory holding "
        "config.json, model.safetensors or pytorch_model.bin, and preprocessor_config.json."
    )


__all__ = ["SafetyGate", "SafetyVerdict", "gate_image", "load_safety_gate", "verdict_margins", "DEFAULT_MODEL", "REFUSAL"]
