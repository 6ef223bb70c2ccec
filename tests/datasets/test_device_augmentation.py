"""Batched on-device light augmentation: the spec's ranges, TorchIO's geometry, seeded and per-sample."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchio as tio

from datasets.augmentation import build_augmentation
from datasets.device_augmentation import (
    LightParams,
    apply_light,
    augment_light,
    draw_light_params,
    light_ranges,
)

SHAPE = (32, 36, 28)  # (X, Y, Z), deliberately unequal so axis mix-ups show
ROOMY = (40, 44, 36)  # for moment measurements: blobs stay > 3.5 sigma from every face


def blob(shape=SHAPE, offset=(0.0, 0.0, 0.0), sigma=(3.0, 3.0, 3.0)) -> torch.Tensor:
    """A (1, X, Y, Z) Gaussian blob displaced ``offset`` voxels from the volume centre."""
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 - o for n, o in zip(shape, offset)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-0.5 * sum((g / s) ** 2 for g, s in zip(grids, sigma))).float()[None]


def moments(volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid (voxels from the centre) and per-axis standard deviation of a (C, X, Y, Z) volume."""
    mass = volume.sum(0).double()
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in mass.shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    centroid = torch.stack([(g * mass).sum() / mass.sum() for g in grids])
    spread = torch.stack([(((g - c) ** 2) * mass).sum() / mass.sum() for g, c in zip(grids, centroid)])
    return centroid, spread.sqrt()


def params(scales=(1.0, 1.0, 1.0), degrees=(0.0, 0.0, 0.0), flip=False) -> LightParams:
    """One sample's parameters, built by hand."""
    return LightParams(torch.tensor([scales]), torch.tensor([degrees]), torch.tensor([flip]))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_strength_zero_returns_the_input_itself():
    batch = torch.rand(2, 1, *SHAPE)
    out = augment_light(batch, 0.0, gen(0))
    assert out is batch and torch.equal(out, batch.clone())


def test_forced_flip_is_left_right_along_x_of_the_ras_batch():
    volume = blob(offset=(-8.0, 2.0, -3.0))  # on the left, slightly anterior and inferior
    batch = torch.stack([volume, volume])
    flip_first = LightParams(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([True, False]))
    out = apply_light(batch, flip_first)
    assert not torch.allclose(torch.flip(volume, dims=[1]), volume, atol=0.1)  # the check below can fail
    torch.testing.assert_close(out[0], torch.flip(volume, dims=[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], volume, atol=1e-5, rtol=0)
    assert moments(out[0])[0][0] == pytest.approx(-moments(volume)[0][0].item(), abs=1e-4)


@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_drawn_parameters_stay_in_the_spec_ranges(strength):
    n = 4000
    drawn = draw_light_params(n, strength, gen(1))
    low, high = max(0.5, 1 - 0.1 * strength), min(2.0, 1 + 0.2 * strength)
    degrees, p = min(45.0, 10 * strength), min(0.5, 0.25 * strength)
    assert drawn.scales.min() >= low and drawn.scales.max() <= high
    assert drawn.scales.min() < low + 0.01 * (high - low) and drawn.scales.max() > high - 0.01 * (high - low)
    assert drawn.degrees.abs().max() <= degrees and drawn.degrees.abs().max() > 0.99 * degrees
    assert drawn.degrees.mean(0).abs().max() < 4 * degrees / math.sqrt(3 * n)  # symmetric about 0, per axis
    assert abs(drawn.flip.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    for values in (drawn.scales, drawn.degrees):  # one independent draw per axis, as TorchIO's isotropic=False
        off_diagonal = torch.corrcoef(values.T.double()) - torch.eye(3, dtype=torch.float64)
        assert off_diagonal.abs().max() < 0.1


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0, 4.0])
def test_ranges_are_the_torchio_light_augmentation(strength):
    affine, flip = build_augmentation("light", strength).transforms
    ranges = light_ranges(strength)
    assert (ranges.scale_low, ranges.scale_high) == pytest.approx(affine.scales[:2])
    assert ranges.max_degrees == pytest.approx(affine.degrees[1])
    assert ranges.flip_probability == pytest.approx(flip.flip_probability)


def test_scale_about_the_centre_enlarges_each_axis_by_its_own_factor():
    volume = blob(ROOMY, sigma=(4.0, 4.5, 3.5))
    out = apply_light(volume[None], params(scales=(1.2, 1.0, 0.9)))[0]
    centroid, spread = moments(out)
    ratio = spread / moments(volume)[1]
    torch.testing.assert_close(ratio, torch.tensor([1.2, 1.0, 0.9], dtype=torch.float64), atol=0.02, rtol=0)
    assert centroid.abs().max() < 0.05  # about the centre: nothing moves


@pytest.mark.parametrize(
    "degrees, start, end",
    [((0, 0, 90), (8, 0, 0), (0, 8, 0)), ((90, 0, 0), (0, 8, 0), (0, 0, 8)), ((0, 90, 0), (0, 0, 8), (8, 0, 0))],
    ids=["Z: right->anterior", "X: anterior->superior", "Y: superior->right"],
)
def test_positive_rotation_is_counter_clockwise_about_the_ras_axis(degrees, start, end):
    out = apply_light(blob(ROOMY, offset=start, sigma=(2.5, 2.5, 2.5))[None], params(degrees=degrees))[0]
    torch.testing.assert_close(moments(out)[0], torch.tensor(end, dtype=torch.float64), atol=0.05, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_matches_torchio_affine_then_flip_for_the_same_parameters(flip):
    volume = blob(offset=(4.0, -3.0, 2.0), sigma=(3.0, 4.0, 2.5))
    scales, degrees = (1.2, 0.9, 1.1), (20.0, -15.0, 30.0)
    steps = [tio.Affine(scales=scales, degrees=degrees, translation=(0, 0, 0))] + [tio.Flip(axes=("LR",))] * flip
    expected = tio.Compose(steps)(tio.ScalarImage(tensor=volume, affine=np.diag([2.0, 2.0, 2.0, 1.0]))).data
    out = apply_light(volume[None], params(scales, degrees, flip))[0]
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0)  # another rotation order misses by > 0.1


def test_same_seed_same_batch_and_different_seeds_differ():
    batch = torch.stack([blob(offset=(-6.0, 3.0, 0.0))] * 3)
    first, again = augment_light(batch, 1.0, gen(7)), augment_light(batch, 1.0, gen(7))
    assert torch.equal(first, again)
    assert not torch.allclose(first, augment_light(batch, 1.0, gen(8)), atol=1e-3)


def test_identical_volumes_in_one_batch_get_their_own_parameters():
    out = augment_light(torch.stack([blob(offset=(-6.0, 3.0, 0.0))] * 2), 1.0, gen(3))
    assert not torch.allclose(out[0], out[1], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtype_and_shape_are_preserved(dtype):
    batch = torch.stack([blob(offset=(-6.0, 3.0, 0.0)), blob(offset=(2.0, 0.0, 5.0))]).repeat(1, 2, 1, 1, 1)
    drawn = draw_light_params(2, 2.0, gen(5))
    out = apply_light(batch.to(dtype), drawn)
    assert out.dtype == dtype and out.shape == batch.shape
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(out.float(), apply_light(batch, drawn), atol=tolerance, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_batch_matches_the_cpu_result(dtype):
    batch = torch.stack([blob(offset=(-6.0, 3.0, 0.0))] * 2)
    drawn = draw_light_params(2, 2.0, gen(5), device="cuda")  # a CPU generator: same numbers on any device
    out = apply_light(batch.to("cuda", dtype), drawn)
    assert out.dtype == dtype and out.device.type == "cuda"
    cpu = apply_light(batch, draw_light_params(2, 2.0, gen(5)))
    torch.testing.assert_close(out.float().cpu(), cpu, atol=1e-2, rtol=0)


@pytest.mark.parametrize("strength", [-0.1, 4.5, float("nan")])
def test_bad_strength_is_named(strength):
    with pytest.raises(ValueError, match="aug_strength"):
        draw_light_params(2, strength, gen(0))
    with pytest.raises(ValueError, match="aug_strength"):
        augment_light(torch.zeros(2, 1, *SHAPE), strength, gen(0))


def test_bad_batches_and_parameters_are_explained():
    with pytest.raises(ValueError, match="batch_size"):
        draw_light_params(0, 1.0, gen(0))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        apply_light(torch.zeros(1, *SHAPE), params())
    with pytest.raises(ValueError, match="params has 1"):
        apply_light(torch.zeros(2, 1, *SHAPE), params())
    with pytest.raises(ValueError, match="scales"):
        LightParams(torch.ones(2, 3), torch.zeros(1, 3), torch.zeros(2, dtype=torch.bool))
