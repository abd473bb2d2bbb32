"""Zero123's pose vector, pinned to hand-computed values (DESIGN.md conventions)."""

import math

import pytest
import torch

from recon.prior.zero123 import pose_vector


def _pinned(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "target, cond, stable, expected",
    [
        # straight up by 30 degrees, quarter turn: polar angle shrinks by 30 deg, sin = 1, cos = 0
        ((30.0, 90.0, 2.0), (0.0, 0.0, 2.0), False, [-math.pi / 6, 1.0, 0.0, 0.0]),
        # below a raised input, azimuth change -45 - 30 = -75 deg, 0.5 further away
        (
            (-10.0, -45.0, 2.5),
            (20.0, 30.0, 2.0),
            False,
            [math.pi / 6, -0.96592582628906831, 0.25881904510252074, 0.5],
        ),
        # the input view itself: no change at all
        ((12.0, 34.0, 2.0), (12.0, 34.0, 2.0), False, [0.0, 0.0, 1.0, 0.0]),
        # Stable Zero123: the last entry is the input's absolute polar angle rad(90 - 5) = 85 deg
        ((45.0, 180.0, 3.8), (5.0, 0.0, 3.8), True, [-2 * math.pi / 9, 0.0, -1.0, 17 * math.pi / 36]),
        # Stable Zero123 ignores distances entirely
        ((0.0, -90.0, 9.0), (-30.0, 0.0, 1.0), True, [-math.pi / 6, -1.0, 0.0, 2 * math.pi / 3]),
    ],
)
def test_pose_vector_hand_computed(target, cond, stable, expected):
    args = [torch.tensor(v, dtype=torch.float64) for v in (*target, *cond)]
    got = pose_vector(*args, stable=stable)
    assert got.shape == (4,)
    torch.testing.assert_close(got, _pinned(expected), rtol=0, atol=1e-12)


def test_pose_vector_broadcasts_a_batch_against_one_input_view():
    elevation = torch.tensor([0.0, 30.0, 60.0])
    azimuth = torch.tensor([0.0, 90.0, 270.0])
    got = pose_vector(elevation, azimuth, 2.0, 15.0, 0.0, 2.0)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    expected = torch.tensor(
        [
            [math.radians(15.0), 0.0, 1.0, 0.0],
            [math.radians(-15.0), 1.0, 0.0, 0.0],
            [math.radians(-45.0), -1.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pose_vector_accepts_plain_numbers():
    got = pose_vector(30, 90, 2, 0, 0, 2)
    torch.testing.assert_close(got, torch.tensor([-math.pi / 6, 1.0, 0.0, 0.0]), rtol=0, atol=1e-6)


def test_pose_vector_polar_form_of_stable_zero123():
    """The first entry is the change of polar angle (polar = 90 - elevation): (90 - E_t) - (90 - E_c)."""
    generator = torch.Generator().manual_seed(0)
    e_t, e_c = torch.rand(2, 16, generator=generator, dtype=torch.float64) * 180 - 90
    a_t, a_c = torch.rand(2, 16, generator=generator, dtype=torch.float64) * 360 - 180
    got = pose_vector(e_t, a_t, 2.0, e_c, a_c, 2.0, stable=True)
    polar_change = torch.deg2rad((90 - e_t) - (90 - e_c))
    torch.testing.assert_close(got[:, 0], polar_change, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[:, 1], torch.sin(torch.deg2rad(a_t - a_c)), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[:, 3], torch.deg2rad(90 - e_c), rtol=0, atol=1e-12)


def test_presets_select_the_pose_vector():
    from recon.config import load_config

    stable = load_config("stable-zero123").prior
    assert stable.stable is True and stable.model.endswith("stable_zero123.ckpt")
    assert load_config("zero123").prior.stable is False
