"""Every layout Zero123 weights come in, built tiny, loads through the public loader."""

import shutil

import huggingface_hub
import pytest
import torch
from diffusers import DDPMScheduler

from recon.errors import MissingWeights
from recon.prior import zero123_loading
from recon.prior.sds import scaled_linear_alphas_cumprod
from recon.prior.zero123_loading import OPENAI_CLIP_MEAN, load_zero123
from tiny_zero123 import CLIP_DIM, CLIP_IMAGE, LAYOUTS, SCHEDULE, build_tiny_zero123, ldm_state_dict, make_tiny_modules


@pytest.fixture(scope="module")
def reference_modules():
    return make_tiny_modules(seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, reference_modules):
    """Each layout built once for the module: {layout: source path}."""
    root = tmp_path_factory.mktemp("tiny_zero123")
    return {layout: build_tiny_zero123(root / layout, layout=layout, modules=reference_modules) for layout in LAYOUTS}


def _assert_same_weights(loaded, expected, exact=True):
    got, want = loaded.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for key in want:
        reference = want[key].half().float() if not exact else want[key]
        torch.testing.assert_close(got[key].float(), reference.float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_the_same_model(layout, built, reference_modules):
    components = load_zero123(str(built[layout]), device="cpu", dtype=torch.float32)
    exact = layout != "fp16"  # fp16 files hold the weights rounded to half precision
    for name in ("unet", "vae", "image_encoder", "projection"):
        _assert_same_weights(getattr(components, name), reference_modules[name], exact=exact)
        assert next(getattr(components, name).parameters()).dtype == torch.float32

    # sizes come from the checkpoint's configs / shapes, not from the real model's 768 / 224
    assert components.unet.config.in_channels == 2 * components.vae.config.latent_channels == 8
    assert components.unet.config.cross_attention_dim == CLIP_DIM
    assert (components.projection.in_features, components.projection.out_features) == (CLIP_DIM + 4, CLIP_DIM)
    assert components.image_encoder.config.projection_dim == CLIP_DIM
    assert components.clip_size == CLIP_IMAGE
    # the checkpoint's own noise schedule (deliberately not Zero123's) is the one used
    expected_alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod.float()
    torch.testing.assert_close(components.alphas_cumprod, expected_alphas)
    assert not torch.allclose(components.alphas_cumprod, scaled_linear_alphas_cumprod())
    assert components.prediction_type == "epsilon"
    if layout == "ckpt":
        assert components.clip_mean == OPENAI_CLIP_MEAN  # FrozenCLIPImageEmbedder's constants
    else:
        assert components.clip_mean == (0.5, 0.25, 0.125)  # read from feature_extractor/


def test_converted_checkpoint_computes_the_same_functions(built, reference_modules):
    """Head counts leave no trace in shapes: only running the converted models shows they are right."""
    components = load_zero123(str(built["ckpt"]), device="cpu")
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 8, 8, 8, generator=generator)
    tokens = torch.randn(2, 1, CLIP_DIM, generator=generator)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        want = reference_modules["unet"](sample, t, encoder_hidden_states=tokens).sample
        got = components.unet(sample, t, encoder_hidden_states=tokens).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        pixels = torch.randn(2, 3, CLIP_IMAGE, CLIP_IMAGE, generator=generator)
        want = reference_modules["image_encoder"](pixel_values=pixels).image_embeds
        got = components.image_encoder(pixel_values=pixels).image_embeds
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
        want = reference_modules["vae"].encode(image).latent_dist.mode()
        got = components.vae.encode(image).latent_dist.mode()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert components.vae.config.scaling_factor == pytest.approx(0.18215)


def test_tiny_checkpoint_uses_the_real_key_layout(reference_modules):
    """Names as they appear in the released Zero123 / Stable Zero123 checkpoints."""
    state = ldm_state_dict(reference_modules)
    conv_in = state["model.diffusion_model.input_blocks.0.0.weight"]
    assert conv_in.shape[1] == 8  # noisy latent + input latent
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.out.2.weight",
        "model_ema.diffusion_modelinput_blocks00weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.model.visual.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.visual.proj",
        "cc_projection.weight",
        "cc_projection.bias",
        "alphas_cumprod",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv in LDM


def _record_torch_load(monkeypatch):
    calls = []
    original = torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


@pytest.mark.parametrize("layout", ["bin", "ckpt"])
def test_pickled_weights_are_read_with_weights_only(layout, built, monkeypatch):
    calls = _record_torch_load(monkeypatch)
    load_zero123(str(built[layout]), device="cpu")
    expected_files = 4 if layout == "bin" else 1  # unet, vae, image encoder, projection / one .ckpt
    assert len(calls) >= expected_files
    assert all(flag is True for flag in calls), calls


def test_fp16_weights_load_in_half_precision(built):
    components = load_zero123(str(built["fp16"]), device="cpu", dtype=torch.float16)
    for name in ("unet", "vae", "image_encoder", "projection"):
        assert next(getattr(components, name).parameters()).dtype == torch.float16


def test_weight_file_choice_prefers_safetensors_and_the_asked_precision():
    names = [
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.bin",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert zero123_loading._pick_weight_files(names, prefer_fp16=False) == ["diffusion_pytorch_model.safetensors"]
    assert zero123_loading._pick_weight_files(names, prefer_fp16=True) == ["diffusion_pytorch_model.fp16.safetensors"]
    assert zero123_loading._pick_weight_files(["model.fp16.safetensors"], prefer_fp16=False) == ["model.fp16.safetensors"]
    assert zero123_loading._pick_weight_files(["pytorch_model.bin"], prefer_fp16=True) == ["pytorch_model.bin"]
    repo = ["model_index.json", "unet/config.json"] + [f"unet/{n}" for n in names[1:]] + ["safety_checker/pytorch_model.bin"]
    patterns = zero123_loading._download_patterns(repo, prefer_fp16=False)
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert not any(p.endswith(".bin") and p.startswith("unet/") for p in patterns)
    assert not any(p.startswith("safety_checker/") for p in patterns)  # never used by the prior


# ----------------------------------------------------------------------------- missing weights


def test_missing_path_names_what_to_download(tmp_path):
    with pytest.raises(MissingWeights) as error:
        load_zero123(str(tmp_path / "pretrained" / "stable_zero123.ckpt"))
    message = str(error.value)
    assert "does not exist" in message and "stable_zero123.ckpt" in message
    assert "hf download stabilityai/stable-zero123" in message
    assert error.value.exit_code == 4


@pytest.mark.parametrize("component, named", [("unet", "unet"), ("image_encoder", "image_encoder"), ("cc_projection", "camera projection")])
def test_folder_missing_a_component(component, named, tmp_path, built):
    folder = tmp_path / "incomplete"
    shutil.copytree(built["cc_projection"], folder)
    shutil.rmtree(folder / component)
    with pytest.raises(MissingWeights) as error:
        load_zero123(str(folder))
    assert f"missing {named}" in str(error.value)


def test_checkpoint_missing_a_part(tmp_path, reference_modules):
    state = {k: v for k, v in ldm_state_dict(reference_modules).items() if not k.startswith("cc_projection.")}
    path = tmp_path / "no_projection.ckpt"
    torch.save({"state_dict": state}, str(path))
    with pytest.raises(MissingWeights) as error:
        load_zero123(str(path))
    assert "cc_projection" in str(error.value) and "not a Zero123 checkpoint" in str(error.value)


def test_uncached_repo_offline_gives_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("went online while offline"))
    with pytest.raises(MissingWeights) as error:
        load_zero123("someone/zero123-not-here", cache_dir=str(tmp_path))
    message = str(error.value)
    assert "hf download someone/zero123-not-here" in message
    assert "huggingface-cli download someone/zero123-not-here" in message


def _fake_hub_cache(cache, repo_id, source):
    """The hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo_dir / "snapshots" / commit)


def test_cached_repo_loads_when_the_hub_is_unreachable(tmp_path, built, monkeypatch):
    _fake_hub_cache(tmp_path, "someone/zero123-tiny", built["clip_camera_projection"])
    asked = []

    def unreachable(repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # even where CI sets it
    components = load_zero123("someone/zero123-tiny", cache_dir=str(tmp_path))
    assert asked == ["someone/zero123-tiny"]  # tried the hub first, then fell back to the cache
    assert components.projection.out_features == CLIP_DIM
    assert components.source == "someone/zero123-tiny"


def test_cached_repo_missing_a_component_says_how_to_fetch_it(tmp_path, built):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(built["cc_projection"], incomplete)
    shutil.rmtree(incomplete / "vae")
    _fake_hub_cache(tmp_path / "cache", "someone/zero123-partial", incomplete)
    with pytest.raises(MissingWeights) as error:
        load_zero123("someone/zero123-partial", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    assert "missing vae" in str(error.value) and "hf download someone/zero123-partial" in str(error.value)


def test_online_repo_fetches_only_the_needed_files(tmp_path, built, monkeypatch):
    source = built["clip_camera_projection"]
    listing = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()) + ["safety_checker/model.safetensors"]
    fetched = {}

    def fake_snapshot_download(repo_id, **kwargs):
        assert not kwargs.get("local_files_only")
        fetched.update(repo_id=repo_id, patterns=kwargs["allow_patterns"])
        return str(source)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    components = load_zero123("someone/zero123-online", cache_dir=str(tmp_path))
    assert fetched["repo_id"] == "someone/zero123-online"
    assert "clip_camera_projection/diffusion_pytorch_model.safetensors" in fetched["patterns"]
    assert "unet/diffusion_pytorch_model.safetensors" in fetched["patterns"]
    assert "safety_checker/model.safetensors" not in fetched["patterns"]
    assert components.unet.config.in_channels == 8
