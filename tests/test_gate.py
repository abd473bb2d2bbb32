"""Safety gate: a tiny random checker with the real classes and on-disk layout, loaded like the real one."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

from recon.errors import MissingWeights, Refused
from recon.gate import SafetyVerdict, load_safety_gate

SIDE = 32  # the tiny CLIP's input resolution
HUB_ID = "recon-tests/tiny-safety-checker"


def tiny_checker(seed: int = 0) -> StableDiffusionSafetyChecker:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=SIDE, patch_size=8
    )
    text = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    # random concepts; thresholds nobody reaches unless a test says otherwise
    checker.concept_embeds.data = torch.randn_like(checker.concept_embeds)
    checker.special_care_embeds.data = torch.randn_like(checker.special_care_embeds)
    checker.concept_embeds_weights.data.fill_(1.5)
    checker.special_care_embeds_weights.data.fill_(1.5)
    return checker


def tiny_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})


def save(checker, directory, processor_subfolder=None):
    """The layout of CompVis/stable-diffusion-safety-checker: config, weights and preprocessor in one folder."""
    checker.save_pretrained(directory)
    tiny_processor().save_pretrained(directory if processor_subfolder is None else directory.parent / processor_subfolder)
    return directory


def photo(seed: int = 1, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def embedding(gate, image) -> torch.Tensor:
    """The image's projected CLIP embedding as the gate computes it (single opaque view)."""
    pixels = gate.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return gate.checker.visual_projection(gate.checker.vision_model(pixels).pooler_output)[0]


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    return save(tiny_checker(), tmp_path_factory.mktemp("checker") / "safety checker")


@pytest.fixture(scope="module")
def gate(checker_dir):
    return load_safety_gate(str(checker_dir), "cpu")


def checker_with(gate, tmp_path, edit):
    """Copy of the test checker with ``edit(checker)`` applied, saved and reloaded through the real path."""
    checker = tiny_checker()
    edit(checker)
    return str(save(checker, tmp_path / "edited"))


def test_loads_local_directory_and_reports_margins(gate, checker_dir):
    verdict = gate.check(photo())
    assert isinstance(verdict, SafetyVerdict)
    assert verdict.flagged is False
    assert len(verdict.concept_scores) == 17 and len(verdict.special_scores) == 3
    assert all(type(score) is float for score in verdict.concept_scores + verdict.special_scores)
    # cos <= 1 and every threshold is 1.5: each margin is at most -0.5
    assert max(verdict.concept_scores) <= -0.5 + 1e-5
    assert verdict.model == str(checker_dir) and verdict.threshold_scale == 1.0


def test_refuses_image_whose_embedding_is_a_concept(gate, tmp_path):
    image = photo(seed=7)
    target = embedding(gate, image)

    def edit(checker):
        checker.concept_embeds.data[5] = target
        checker.concept_embeds_weights.data[5] = 0.5

    flagging = load_safety_gate(checker_with(gate, tmp_path, edit), "cpu")
    verdict = flagging.check(image)
    assert verdict.flagged is True
    assert verdict.concept_scores[5] == pytest.approx(0.5, abs=1e-4)  # cos = 1 against threshold 0.5
    assert max(verdict.concept_scores[:5] + verdict.concept_scores[6:]) < 0
    with pytest.raises(Refused, match="safety checker"):
        verdict.raise_if_flagged()
    gate.check(image).raise_if_flagged()  # the unedited checker lets it through


def test_threshold_scale_moves_the_verdict(gate, tmp_path):
    image = photo(seed=3)
    target = embedding(gate, image)

    def edit(checker):
        checker.concept_embeds.data[0] = target
        checker.concept_embeds_weights.data[0] = 1.0 / 1.03  # cos = 1 clears it at scale 1, not at 1.07

    directory = checker_with(gate, tmp_path, edit)
    strict = load_safety_gate(directory, "cpu", threshold_scale=1.0).check(image)
    lenient = load_safety_gate(directory, "cpu", threshold_scale=1.07).check(image)
    stricter = load_safety_gate(directory, "cpu", threshold_scale=0.9).check(image)
    assert strict.flagged is True and lenient.flagged is False and stricter.flagged is True
    assert stricter.concept_scores[0] > strict.concept_scores[0] > 0 > lenient.concept_scores[0]
    assert lenient.concept_scores[0] == pytest.approx(1.0 - 1.07 / 1.03, abs=1e-4)
    assert lenient.threshold_scale == 1.07


def test_special_care_concept_tightens_every_threshold(gate, tmp_path):
    image = photo(seed=4)
    target = embedding(gate, image)

    def near_miss(checker):
        checker.concept_embeds.data[2] = target
        checker.concept_embeds_weights.data[2] = 1.005  # misses by 0.005 ...

    def near_miss_with_special_care(checker):
        near_miss(checker)
        checker.special_care_embeds.data[1] = target
        checker.special_care_embeds_weights.data[1] = 0.5  # ... until a special-care concept fires (+0.01)

    plain = load_safety_gate(checker_with(gate, tmp_path / "a", near_miss), "cpu").check(image)
    special = load_safety_gate(checker_with(gate, tmp_path / "b", near_miss_with_special_care), "cpu").check(image)
    assert plain.flagged is False and plain.concept_scores[2] == pytest.approx(-0.005, abs=1e-4)
    assert special.special_scores[1] > 0
    assert special.flagged is True and special.concept_scores[2] == pytest.approx(0.005, abs=1e-4)


def test_same_decision_as_diffusers_forward(gate, tmp_path):
    """Our restated verdict against the checker's own forward, with a threshold that splits the images."""
    images = [photo(seed=s) for s in range(3)] + [Image.new("RGB", (64, 64), c) for c in ("white", "black", "red", "navy")]
    embeds = torch.stack([embedding(gate, im) for im in images])
    cos = torch.nn.functional.normalize(embeds, dim=-1) @ torch.nn.functional.normalize(gate.checker.concept_embeds, dim=-1).T
    # every concept out of reach but one, whose threshold sits in the widest gap between the images' similarities
    concept = int((cos.amax(dim=0) - cos.amin(dim=0)).argmax())
    ranked = cos[:, concept].sort().values
    gap = int((ranked[1:] - ranked[:-1]).argmax())
    assert ranked[gap + 1] - ranked[gap] > 0.01  # far from the edge, where diffusers' rounding could differ
    thresholds = cos.amax(dim=0) + 0.05
    thresholds[concept] = (ranked[gap] + ranked[gap + 1]) / 2

    def edit(checker):
        checker.concept_embeds_weights.data = thresholds.clone()

    edited = load_safety_gate(checker_with(gate, tmp_path, edit), "cpu")
    ours = [edited.check(im) for im in images]
    pixels = edited.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    _, theirs = edited.checker(clip_input=pixels, images=np.zeros((len(images), 4, 4, 3)))
    assert [v.flagged for v in ours] == list(theirs)
    assert 0 < sum(theirs) < len(images)  # the comparison covers both outcomes
    margins = torch.tensor([v.concept_scores for v in ours])
    assert torch.allclose(margins, cos - thresholds, atol=1e-4)


def test_transparent_image_is_also_checked_composited_on_white(gate, tmp_path):
    # colour all black; the visible shape exists only in the alpha channel
    alpha = np.zeros((64, 64), np.uint8)
    alpha[8:56, 20:44] = 255
    rgba = np.dstack([np.zeros((64, 64, 3), np.uint8), alpha])
    image = Image.fromarray(rgba, "RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    target = embedding(gate, on_white)
    black = embedding(gate, Image.new("RGB", image.size, "black"))
    similarity = torch.nn.functional.cosine_similarity(target, black, dim=0).item()
    assert similarity < 0.999  # the two views are distinguishable to this checker

    def edit(checker):
        checker.concept_embeds.data[0] = target
        checker.concept_embeds_weights.data[0] = 0.9995

    edited = load_safety_gate(checker_with(gate, tmp_path, edit), "cpu")
    assert edited.check(Image.new("RGB", image.size, "black")).flagged is False  # the colour alone passes
    assert edited.check(image).flagged is True  # what the pipeline would see does not


def test_large_images_are_downscaled_before_the_checker(checker_dir):
    gate = load_safety_gate(str(checker_dir), "cpu", max_side=100)
    seen = []
    processor = gate.processor

    def spy(images, **kwargs):
        seen.extend(im.size for im in images)
        return processor(images=images, **kwargs)

    gate.processor = spy
    gate.check(photo(size=(400, 250)))
    gate.check(photo(size=(60, 40)))
    assert seen == [(100, 62), (60, 40)]


def test_loads_stable_diffusion_pipeline_layout(tmp_path):
    pipeline = tmp_path / "sd pipeline"
    save(tiny_checker(), pipeline / "safety_checker", processor_subfolder="feature_extractor")
    assert not load_safety_gate(str(pipeline), "cpu").check(photo()).flagged


def test_loads_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves through the real cache layout (refs/main -> snapshots/<commit>) with no network."""
    cache = tmp_path / "hf home" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    save(tiny_checker(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    verdict = load_safety_gate(HUB_ID, "cpu").check(photo())
    assert verdict.model == HUB_ID and verdict.flagged is False


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty hf home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.mark.parametrize("model", [HUB_ID, "CompVis/stable-diffusion-safety-checker"])
def test_missing_hub_entry_offline_is_missing_weights(model, offline_empty_cache):
    start = time.perf_counter()
    with pytest.raises(MissingWeights) as caught:
        load_safety_gate(model, "cpu")
    message = str(caught.value)
    assert f"hf download {model}" in message and model in message
    assert "offline" in message and "empty hf home" in message  # says where it looked
    assert "\n" not in message
    assert time.perf_counter() - start < 10  # offline: no network retries


def test_missing_directory_is_missing_weights(tmp_path, offline_empty_cache):
    with pytest.raises(MissingWeights, match="not a directory.*hf download CompVis/stable-diffusion-safety-checker"):
        load_safety_gate(str(tmp_path / "no such checker"), "cpu")


def _empty(directory):
    directory.mkdir()


def _no_weights(directory):
    save(tiny_checker(), directory)
    (directory / "model.safetensors").unlink()


def _corrupt_weights(directory):
    save(tiny_checker(), directory)
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)


def _no_preprocessor(directory):
    save(tiny_checker(), directory)
    (directory / "preprocessor_config.json").unlink()


def _broken_config(directory):
    save(tiny_checker(), directory)
    (directory / "config.json").write_text("{ not json")


def _no_concepts(directory):
    """Weights of a plain CLIP vision tower without the checker's concept tensors."""
    from safetensors.torch import save_file

    save(tiny_checker(), directory)
    state = {k: v.contiguous() for k, v in tiny_checker().state_dict().items() if "concept" not in k and "special" not in k}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "make, expected",
    [
        (_empty, "cannot load"),
        (_no_weights, "cannot load"),
        (_corrupt_weights, "cannot load"),
        (_no_preprocessor, "cannot load"),
        (_broken_config, "cannot load"),
        (_no_concepts, "incomplete.*concept_embeds"),
    ],
)
def test_bad_directory_is_missing_weights(tmp_path, make, expected, offline_empty_cache):
    directory = tmp_path / "checker"
    make(directory)
    with pytest.raises(MissingWeights, match=expected) as caught:
        load_safety_gate(str(directory), "cpu")
    message = str(caught.value)
    assert str(directory) in message and "hf download" in message and "\n" not in message


def test_a_file_instead_of_a_directory_is_missing_weights(tmp_path, checker_dir):
    weights = tmp_path / "model.safetensors"
    shutil.copy(checker_dir / "model.safetensors", weights)
    with pytest.raises(MissingWeights, match="not a directory"):
        load_safety_gate(str(weights), "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_verdict_matches_cpu(checker_dir):
    images = [photo(seed=s) for s in range(3)]
    on_cpu = load_safety_gate(str(checker_dir), "cpu")
    on_gpu = load_safety_gate(str(checker_dir), "cuda")
    for image in images:
        cpu, gpu = on_cpu.check(image), on_gpu.check(image)
        assert cpu.flagged == gpu.flagged
        np.testing.assert_allclose(cpu.concept_scores, gpu.concept_scores, atol=1e-4)
        np.testing.assert_allclose(cpu.special_scores, gpu.special_scores, atol=1e-4)
