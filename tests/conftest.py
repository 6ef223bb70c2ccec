"""Shared fixtures: tiny NIfTI volumes and trees, so tests run in seconds on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import nibabel as nib
import numpy as np
import pytest


def write_ellipsoid(path: Path, shape=(24, 28, 20), zooms=(4.0, 4.0, 4.0), codes_flip=(-1, -1, 1), seed=0) -> Path:
    """A skull-stripped-looking blob: positive inside an ellipsoid, zero outside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    data = np.where(inside, 100 + 20 * rng.standard_normal(shape), 0).astype(np.float32)
    affine = np.diag([codes_flip[0] * zooms[0], codes_flip[1] * zooms[1], codes_flip[2] * zooms[2], 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_head(path: Path, shape=(24, 28, 20), zooms=(4.0, 4.0, 4.0), seed=0) -> Path:
    """An unstripped-looking head: the same blob inside a brighter skull shell, noise everywhere else."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = (grid**2).sum(0)
    data = np.abs(5 + 3 * rng.standard_normal(shape))  # scanner noise: never exactly zero
    data[radius < 0.8] = 180 + 10 * rng.standard_normal(int((radius < 0.8).sum()))
    data[radius < 0.6] = 100 + 20 * rng.standard_normal(int((radius < 0.6).sum()))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*zooms, 1.0])), str(path))
    return path


def write_brats_tree(root: Path, per_grade: int) -> Path:
    """``per_grade`` blob subjects in each of BraTS's HGG/ and LGG/ folders (t1ce only), as discovery expects them."""
    for offset, grade in ((0, "HGG"), (100, "LGG")):  # distinct volumes: one volume under two ids is refused
        for i in range(per_grade):
            write_ellipsoid(root / f"{grade}/{grade}{i}/{grade}{i}_t1ce.nii.gz", seed=offset + i)
    return root


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small synthetic BraTS + IXI tree (the project's own phantoms), shared by the session."""
    from datasets.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("phantoms")
    return write_synthetic_dataset(root, n_hgg=8, n_lgg=8, n_healthy=8, seed=3, downsample=4)
