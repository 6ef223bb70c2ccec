"""Augmentation strength: none at 0, the paper's at 1, capped above; never on evaluation data."""
import numpy as np
import pytest
import torch
import torchio as tio

from datasets.augmentation import build_augmentation
from datasets.volume_dataset import VolumeDataset


def test_strength_zero_and_none_mean_no_transform():
    assert build_augmentation("light", 0.0) is None
    assert build_augmentation("heavy", 0.0) is None
    assert build_augmentation("none", 1.5) is None


def test_strength_one_is_the_papers_light_augmentation():
    affine, flip = build_augmentation("light", 1.0).transforms
    assert isinstance(affine, tio.RandomAffine) and isinstance(flip, tio.RandomFlip)
    assert affine.scales == (0.9, 1.2, 0.9, 1.2, 0.9, 1.2)
    assert affine.degrees == (-10, 10, -10, 10, -10, 10)
    assert flip.flip_probability == 0.25 and flip.axes == ("LR",)


def test_ranges_grow_with_strength_and_are_capped():
    affine, flip = build_augmentation("light", 4.0).transforms
    assert affine.scales[:2] == pytest.approx((0.6, 1.8))
    assert affine.degrees[1] == 40.0 and flip.flip_probability == 0.5


def test_heavy_adds_elastic_and_kspace_artefacts():
    names = [type(t).__name__ for t in build_augmentation("heavy", 1.0).transforms]
    assert names == ["RandomAffine", "RandomFlip", "RandomElasticDeformation", "RandomMotion", "RandomSpike", "RandomGhosting"]


@pytest.mark.parametrize("kind, strength, message", [("medium", 1.0, "augmentation must be one of"), ("light", -1, "aug_strength")])
def test_bad_options_are_named(kind, strength, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation(kind, strength)


def test_dataset_without_transform_returns_the_cached_volume_in_video_layout():
    volumes = np.random.default_rng(0).random((2, 1, 6, 7, 5)).astype(np.float16)
    item, target = VolumeDataset(volumes, [1], [2], spacing=2.0)[0]
    assert target == 2 and item.shape == (1, 5, 7, 6)  # (C, slices=Z, Y, X)
    torch.testing.assert_close(item, torch.from_numpy(volumes[1].astype(np.float32)).permute(0, 3, 2, 1))


def test_dataset_with_transform_changes_the_volume():
    volumes = np.random.default_rng(0).random((1, 1, 12, 12, 12)).astype(np.float16)
    torch.manual_seed(0)
    item, _ = VolumeDataset(volumes, [0], [0], 2.0, transform=build_augmentation("light", 2.0))[0]
    assert not torch.allclose(item, torch.from_numpy(volumes[0].astype(np.float32)).permute(0, 3, 2, 1))
