import pytest

from recon.config import apply_overrides, from_dict, load_config, to_dict
from recon.errors import BadInput


def test_presets_load_and_override():
    cfg = load_config("cpu", ["fit.steps=7", "camera.elevation_range=[0,45]"])
    assert cfg.fit.steps == 7 and cfg.camera.elevation_range == [0, 45]
    default = load_config(None)
    assert default.prior.kind == "zero123" and default.fit.steps > cfg.fit.steps
    assert load_config("stable-zero123").prior.stable is True


def test_yaml_path_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("fit:\n  steps: 3\n")
    assert load_config(str(path)).fit.steps == 3


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        ("nope", [], "unknown config preset"),
        ("cpu", ["fit.stepz=3"], "invalid config"),
        ("cpu", ["fit.steps=many"], "invalid config"),
        ("cpu", ["fit.steps"], "malformed override"),
        ("missing.yaml", [], "config file not found"),
    ],
)
def test_bad_config_is_one_line(preset, overrides, message):
    with pytest.raises(BadInput) as error:
        load_config(preset, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_round_trip_and_apply_overrides():
    cfg = load_config("cpu")
    again = from_dict(to_dict(cfg))
    assert again == cfg
    changed = apply_overrides(again, ["texture.size=64"])
    assert changed.texture.size == 64 and changed.fit == cfg.fit
    with pytest.raises(BadInput):
        apply_overrides(cfg, ["texture.bogus=1"])
