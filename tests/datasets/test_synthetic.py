"""Tests of the synthetic BraTS + IXI generator (all at downsample=4 to stay fast)."""
from __future__ import annotations

import math
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from datasets import synthetic
from datasets.synthetic import (
    CLASSES,
    LABEL_ENHANCING,
    LABEL_NECROSIS,
    LABEL_OEDEMA,
    draw_subject_parameters,
    subject_geometry,
    synthesize_subject,
    write_synthetic_dataset,
)

F = 4.0
IXI_NAME = re.compile(r"IXI\d{3}-(Guys|HH|IOP)-\d{4}-T1\.nii\.gz")
ALL_CONTRASTS = ("t1", "t1ce", "flair")


def _load(path: pathlib.Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def _brats_files(root: pathlib.Path, label: str, contrast: str) -> list[pathlib.Path]:
    return sorted((root / "MICCAI_BraTS_2019_Data_Training" / label).glob(f"*/*_{contrast}.nii.gz"))


def _ixi_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / "IXI").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic")
    returned = write_synthetic_dataset(out, 2, 2, 4, seed=0, downsample=F, contrasts=ALL_CONTRASTS)
    assert returned == out and isinstance(returned, pathlib.Path)
    return out


# ------------------------------------------------------------------------------------ layout
def test_tree_layout_and_names(tree: pathlib.Path) -> None:
    brats = tree / "MICCAI_BraTS_2019_Data_Training"
    hgg = sorted(p.name for p in (brats / "HGG").iterdir())
    lgg = sorted(p.name for p in (brats / "LGG").iterdir())
    # Ids run across HGG then LGG, like one BraTS release.
    assert hgg == ["BraTS19_SYN_0001", "BraTS19_SYN_0002"]
    assert lgg == ["BraTS19_SYN_0003", "BraTS19_SYN_0004"]
    for label, sids in (("HGG", hgg), ("LGG", lgg)):
        for sid in sids:
            names = sorted(p.name for p in (brats / label / sid).iterdir())
            assert names == sorted(f"{sid}_{c}.nii.gz" for c in ALL_CONTRASTS)
    ixi = [p.name for p in _ixi_files(tree)]
    assert len(ixi) == 4
    assert all(IXI_NAME.fullmatch(name) for name in ixi), ixi
    assert len({name[:6] for name in ixi}) == 4  # IXI<nnn> unique
    assert len({name.split("-")[2] for name in ixi}) == 4  # 4-digit numbers unique
    assert {name.split("-")[1] for name in ixi} == {"Guys", "HH", "IOP"}
    # Nothing else (no leftover temporary files, IXI T1 only whatever `contrasts` said).
    every_file = [p for p in tree.rglob("*") if p.is_file()]
    assert len(every_file) == 2 * 3 + 2 * 3 + 4
    assert all(p.name.endswith(".nii.gz") and not p.name.startswith(".") for p in every_file)


def test_default_contrast_is_t1ce_only(tmp_path: pathlib.Path) -> None:
    write_synthetic_dataset(tmp_path, 1, 1, 0, downsample=F)
    names = sorted(p.name for p in tmp_path.rglob("*.nii.gz"))
    assert names == ["BraTS19_SYN_0001_t1ce.nii.gz", "BraTS19_SYN_0002_t1ce.nii.gz"]
    assert not (tmp_path / "IXI").exists()


# ------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_data(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_synthetic_dataset(tmp_path, 2, 2, 4, seed=0, downsample=F, contrasts=ALL_CONTRASTS)
    for original in sorted(tree.rglob("*.nii.gz")):
        again = tmp_path / original.relative_to(tree)
        assert again.read_bytes() == original.read_bytes(), original.name


def test_different_seed_gives_different_data(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_synthetic_dataset(tmp_path, 1, 1, 1, seed=1, downsample=F)
    pairs = [
        (_brats_files(tree, "HGG", "t1ce")[0], _brats_files(tmp_path, "HGG", "t1ce")[0]),
        (_brats_files(tree, "LGG", "t1ce")[0], _brats_files(tmp_path, "LGG", "t1ce")[0]),
        (_ixi_files(tree)[0], _ixi_files(tmp_path)[0]),
    ]
    for a, b in pairs:
        assert not np.array_equal(_load(a)[0], _load(b)[0])


def test_files_equal_in_memory_rendering(tree: pathlib.Path) -> None:
    """Tests below use synthesize_subject(); it must be exactly what was written."""
    lgg = draw_subject_parameters(0, 1, "LGG")  # second LGG = BraTS19_SYN_0004
    subject = synthesize_subject(lgg, ALL_CONTRASTS, F)
    for contrast in ALL_CONTRASTS:
        data, image = _load(_brats_files(tree, "LGG", contrast)[1])
        np.testing.assert_array_equal(data, subject.images[contrast])
        np.testing.assert_allclose(image.affine, subject.affine)


def test_subject_does_not_depend_on_other_counts(tmp_path: pathlib.Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_dataset(a, 0, 1, 0, downsample=F)
    write_synthetic_dataset(b, 2, 1, 0, downsample=F)
    # Same subject (LGG #0), only its BraTS id moves.
    np.testing.assert_array_equal(
        _load(_brats_files(a, "LGG", "t1ce")[0])[0], _load(_brats_files(b, "LGG", "t1ce")[0])[0]
    )


def test_contrast_selection_does_not_change_other_contrasts() -> None:
    parameters = draw_subject_parameters(3, 0, "HGG")
    alone = synthesize_subject(parameters, ("t1ce",), F).images["t1ce"]
    together = synthesize_subject(parameters, ALL_CONTRASTS, F).images["t1ce"]
    np.testing.assert_array_equal(alone, together)


# ---------------------------------------------------------------------------------- geometry
def test_brats_geometry(tree: pathlib.Path) -> None:
    for path in _brats_files(tree, "HGG", "t1ce") + _brats_files(tree, "LGG", "flair"):
        data, image = _load(path)
        assert data.shape == (60, 60, 39)  # 240, 240, 155 divided by 4, rounded
        assert data.dtype == np.int16
        np.testing.assert_allclose(image.header.get_zooms(), (F, F, F))
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        np.testing.assert_allclose(image.affine[:3, :3], np.diag([-F, -F, F]))
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_ixi_geometry(tree: pathlib.Path) -> None:
    for path in _ixi_files(tree):
        data, image = _load(path)
        assert data.shape == (64, 64, 38)  # 256, 256, 150 divided by 4, rounded
        np.testing.assert_allclose(image.header.get_zooms(), (0.9375 * F, 0.9375 * F, 1.2 * F))
        codes = nib.aff2axcodes(image.affine)
        assert codes != ("L", "P", "S") and codes[2] in ("L", "R")  # sagittal: 1.2 mm axis is L-R
        assert codes == ("P", "S", "R")


def test_full_resolution_grids_keep_the_field_of_view() -> None:
    brats, ixi = subject_geometry("brats", 1.0), subject_geometry("ixi", 1.0)
    assert brats.shape == (240, 240, 155) and brats.voxel_mm == (1.0, 1.0, 1.0)
    assert ixi.shape == (256, 256, 150) and ixi.voxel_mm == (0.9375, 0.9375, 1.2)
    for source in ("brats", "ixi"):
        full, small = subject_geometry(source, 1.0), subject_geometry(source, F)
        fov_full = np.multiply(full.shape, full.voxel_mm)
        fov_small = np.multiply(small.shape, small.voxel_mm)
        assert np.all(np.abs(fov_full - fov_small) <= F)
        centre = lambda g: g.affine @ np.r_[(np.asarray(g.shape) - 1) / 2, 1]  # noqa: E731
        np.testing.assert_allclose(centre(full), centre(small), atol=1e-6)
    assert min(subject_geometry("brats", 1000.0).shape) == 8  # never below 8 voxels


# -------------------------------------------------------------------------- skull stripping
@pytest.mark.parametrize("label", CLASSES)
def test_skull_stripped_brain(label: str) -> None:
    subject = synthesize_subject(draw_subject_parameters(0, 0, label), ("t1",), F)
    data = subject.images["t1"]
    inside = subject.brain_mask
    assert np.all(np.isfinite(data.astype(np.float64)))
    assert np.all(data[inside] > 0) and np.all(data[~inside] == 0)
    # One blob of plausible size, well inside the field of view on all sides but the bottom,
    # where BraTS-like volumes may cut the brainstem.
    volume_litres = inside.sum() * np.prod(subject_geometry(subject.parameters.source, F).voxel_mm) / 1e6
    assert 1.2 < volume_litres < 2.5
    components, count = ndimage.label(inside)
    assert np.bincount(components.ravel())[1:].max() > 0.99 * inside.sum()
    corners = data[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    assert np.all(corners == 0)
    ras = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(subject.affine))
    for axis in range(3):
        faces = np.take(ras, [0, -1], axis=axis)
        if axis == 2:
            faces = faces[..., 1]  # superior face only
        assert np.all(faces == 0), axis


def test_intensity_scales_differ_between_sources() -> None:
    brats = [synthesize_subject(draw_subject_parameters(0, i, "LGG"), ("t1ce",), F) for i in range(2)]
    ixi = [synthesize_subject(draw_subject_parameters(0, i, "Healthy"), ("t1",), F) for i in range(2)]
    brats_median = min(np.median(s.images["t1ce"][s.brain_mask]) for s in brats)
    ixi_median = max(np.median(s.images["t1"][s.brain_mask]) for s in ixi)
    assert brats_median > 1.5 * ixi_median


# ---------------------------------------------------------------------------- class signal
def _healthy_part(subject: synthetic.SyntheticSubject, contrast: str) -> np.ndarray:
    return subject.images[contrast][subject.brain_mask & (subject.labels == 0)]


@pytest.mark.parametrize("index", range(3))
def test_hgg_has_enhancing_rim_necrosis_and_oedema(index: int) -> None:
    subject = synthesize_subject(draw_subject_parameters(0, index, "HGG"), ALL_CONTRASTS, F)
    labels = subject.labels
    assert {LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING} <= set(np.unique(labels).tolist())
    rim = labels == LABEL_ENHANCING
    # t1ce: most of the rim is brighter than (almost) any healthy tissue ...
    t1ce = subject.images["t1ce"]
    assert np.mean(t1ce[rim] > np.percentile(_healthy_part(subject, "t1ce"), 99)) > 0.3
    # ... the necrotic core is dark ...
    assert np.median(t1ce[labels == LABEL_NECROSIS]) < np.median(_healthy_part(subject, "t1ce"))
    # ... and without contrast agent the rim does not stand out.
    t1 = subject.images["t1"]
    assert np.mean(t1[rim] > np.percentile(_healthy_part(subject, "t1"), 99)) < 0.05
    # FLAIR: oedema hyperintense, mildly hypointense on T1.
    flair = subject.images["flair"]
    oedema = labels == LABEL_OEDEMA
    assert np.median(flair[oedema]) > np.percentile(_healthy_part(subject, "flair"), 95)
    assert np.median(t1[oedema]) < np.median(_healthy_part(subject, "t1"))


@pytest.mark.parametrize("index", range(3))
def test_lgg_is_hypointense_without_rim(index: int) -> None:
    subject = synthesize_subject(draw_subject_parameters(0, index, "LGG"), ALL_CONTRASTS, F)
    labels = subject.labels
    assert LABEL_ENHANCING not in labels
    tumour = labels == LABEL_NECROSIS  # BraTS code 1: non-enhancing tumour
    assert tumour.sum() * F**3 > 4 / 3 * math.pi * 10**3  # at least a 10 mm-radius ball
    t1ce = subject.images["t1ce"]
    healthy = _healthy_part(subject, "t1ce")
    assert np.mean(t1ce[tumour] > np.percentile(healthy, 99)) < 0.01
    assert np.median(t1ce[tumour]) < 0.85 * np.median(healthy)
    flair = subject.images["flair"]
    assert np.median(flair[tumour]) > np.percentile(_healthy_part(subject, "flair"), 95)


def test_healthy_has_no_lesion() -> None:
    parameters = draw_subject_parameters(0, 0, "Healthy")
    assert parameters.lesion is None and parameters.source == "ixi"
    assert not synthesize_subject(parameters, ("t1",), F).labels.any()


@pytest.mark.parametrize("label", ["HGG", "LGG"])
def test_lesions_lie_in_one_hemisphere_and_vary(label: str) -> None:
    lesions = [draw_subject_parameters(0, i, label).lesion for i in range(8)]
    centres = np.array([lesion.centre_mm for lesion in lesions])
    assert np.all(np.abs(centres[:, 0]) > 5)  # off the midline
    assert len(set(np.sign(centres[:, 0]))) == 2  # both hemispheres occur
    assert np.ptp(centres, axis=0).min() > 10  # locations vary
    assert np.ptp([lesion.radius_mm for lesion in lesions]) > 3  # sizes vary
    subject = synthesize_subject(draw_subject_parameters(0, 0, label), ("t1ce",), F)
    voxels = np.argwhere(subject.labels > 0)
    world_x = nib.affines.apply_affine(subject.affine, voxels)[:, 0]
    # Subject space is close to template space, so the lesion stays on the drawn side.
    assert np.mean(np.sign(world_x) == np.sign(lesions[0].centre_mm[0])) > 0.9


# -------------------------------------------------------------------------------- robustness
def test_write_is_atomic(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x_t1ce.nii.gz"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.save_nifti_atomic(np.ones((8, 8, 8), np.int16), np.eye(4), target)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_hgg": -1}, "n_hgg"),
        ({"n_lgg": -2}, "n_lgg"),
        ({"n_healthy": -1}, "n_healthy"),
        ({"n_hgg": 1.5}, "n_hgg"),
        ({"n_hgg": 0, "n_lgg": 0, "n_healthy": 0}, "all zero"),
        ({"downsample": 0}, "downsample"),
        ({"downsample": -2.0}, "downsample"),
        ({"downsample": float("nan")}, "downsample"),
        ({"contrasts": ("t1ce", "t2")}, "contrast"),
        ({"contrasts": ()}, "contrasts"),
        ({"seed": -1}, "seed"),
        ({"n_healthy": 1000}, "n_healthy"),
    ],
)
def test_invalid_arguments(tmp_path: pathlib.Path, kwargs: dict, message: str) -> None:
    arguments = {"n_hgg": 1, "n_lgg": 1, "n_healthy": 1, "downsample": F} | kwargs
    with pytest.raises(ValueError, match=message):
        write_synthetic_dataset(tmp_path, **arguments)
    assert list(tmp_path.iterdir()) == []  # validated before anything is written


def test_invalid_label() -> None:
    with pytest.raises(ValueError, match="label"):
        draw_subject_parameters(0, 0, "GBM")
