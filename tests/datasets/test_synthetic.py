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
    brats_subject_id,
    draw_subject_parameters,
    plan_dataset,
    subject_geometry,
    synthesize_head,
    synthesize_subject,
    write_synthetic_dataset,
)

F = 4.0
IXI_NAME = re.compile(r"IXI\d{3}-(Guys|HH|IOP)-\d{4}-T1\.nii\.gz")
BRATS_ID = re.compile(r"BraTS19_([A-Za-z0-9]+)_(\d{4})_1")
ALL_CONTRASTS = ("t1", "t1ce", "flair")


def _load(path: pathlib.Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def _brats_files(root: pathlib.Path, label: str, contrast: str) -> list[pathlib.Path]:
    return sorted((root / "MICCAI_BraTS_2019_Data_Training" / label).glob(f"*/*_{contrast}.nii.gz"))


def _brats_file(root: pathlib.Path, label: str, sid: str, contrast: str) -> pathlib.Path:
    return root / "MICCAI_BraTS_2019_Data_Training" / label / sid / f"{sid}_{contrast}.nii.gz"


def _ixi_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / "IXI").glob("*.nii.gz"))


def _faces(data: np.ndarray) -> np.ndarray:
    """All voxels on the six outer faces of the field of view."""
    return np.concatenate([np.take(data, [0, -1], axis=axis).ravel() for axis in range(3)])


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
    # Numbers run across HGG then LGG; sites follow each grade's cycle.
    assert hgg == ["BraTS19_CBICA_0001_1", "BraTS19_CBICA_0002_1"]
    assert lgg == ["BraTS19_TCIA09_0004_1", "BraTS19_TCIA10_0003_1"]
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
    assert names == ["BraTS19_CBICA_0001_1_t1ce.nii.gz", "BraTS19_TCIA10_0002_1_t1ce.nii.gz"]
    assert not (tmp_path / "IXI").exists()


def test_brats_subject_id() -> None:
    assert brats_subject_id("HGG", 0, 1) == "BraTS19_CBICA_0001_1"
    assert brats_subject_id("HGG", 3, 12) == "BraTS19_2013_0012_1"
    assert brats_subject_id("HGG", 6, 7) == "BraTS19_TCIA02_0007_1"  # the cycle restarts after 4
    assert brats_subject_id("LGG", 1, 9999) == "BraTS19_TCIA09_9999_1"
    with pytest.raises(ValueError, match="grade"):
        brats_subject_id("Healthy", 0, 1)
    with pytest.raises(ValueError, match="number"):
        brats_subject_id("HGG", 0, 10000)


def test_brats_ids_carry_imbalanced_sites(tmp_path: pathlib.Path) -> None:
    plan = plan_dataset(tmp_path, 8, 6, 0)
    sites: dict[str, list[str]] = {"HGG": [], "LGG": []}
    numbers = []
    for planned in plan:
        match = BRATS_ID.fullmatch(planned.subject_id)
        assert match, planned.subject_id
        sites[planned.label].append(match.group(1))
        numbers.append(int(match.group(2)))
        # The release's folder layout, whatever the id looks like.
        path = planned.files["t1ce"]
        assert path.relative_to(tmp_path).parts == (
            "MICCAI_BraTS_2019_Data_Training", planned.label, planned.subject_id,
            f"{planned.subject_id}_t1ce.nii.gz",
        )
    assert sorted(numbers) == list(range(1, 15))  # unique over the whole tree
    assert set(sites["HGG"]) == {"CBICA", "TCIA02", "2013"}
    assert set(sites["LGG"]) == {"TCIA10", "TCIA09", "2013"}
    assert sites["HGG"].count("CBICA") == 4  # half of HGG, and no LGG, as in BraTS 2019
    assert not {"TCIA09", "TCIA10"} & set(sites["HGG"])


@pytest.mark.parametrize(
    ("ixi", "stripped_name", "head_name"),
    [("stripped", "-T1.nii.gz", None), ("raw", None, "-T1.nii.gz"),
     ("raw+brain", "-T1_brain.nii.gz", "-T1.nii.gz")],
)
def test_plan_ixi_modes(tmp_path: pathlib.Path, ixi: str, stripped_name: str | None,
                        head_name: str | None) -> None:
    (planned,) = plan_dataset(tmp_path, 0, 0, 1, ixi=ixi)
    stem = tmp_path / "IXI" / planned.subject_id
    assert planned.files == ({"t1": pathlib.Path(f"{stem}{stripped_name}")} if stripped_name else {})
    assert planned.head_files == ({"t1": pathlib.Path(f"{stem}{head_name}")} if head_name else {})
    assert planned.contrasts == ("t1",)


# ------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_data(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_synthetic_dataset(tmp_path, 2, 2, 4, seed=0, downsample=F, contrasts=ALL_CONTRASTS)
    for original in sorted(tree.rglob("*.nii.gz")):
        again = tmp_path / original.relative_to(tree)
        assert again.read_bytes() == original.read_bytes(), original.name


def test_different_seed_gives_different_data(tree: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_synthetic_dataset(tmp_path, 1, 1, 1, seed=1, downsample=F)
    # The same subjects (first of each class) under both seeds.
    pairs = [
        (_brats_file(tree, "HGG", "BraTS19_CBICA_0001_1", "t1ce"),
         _brats_file(tmp_path, "HGG", "BraTS19_CBICA_0001_1", "t1ce")),
        (_brats_file(tree, "LGG", "BraTS19_TCIA10_0003_1", "t1ce"),
         _brats_file(tmp_path, "LGG", "BraTS19_TCIA10_0002_1", "t1ce")),
        (_ixi_files(tree)[0], _ixi_files(tmp_path)[0]),
    ]
    for a, b in pairs:
        assert not np.array_equal(_load(a)[0], _load(b)[0])


def test_files_equal_in_memory_rendering(tree: pathlib.Path) -> None:
    """Tests below use synthesize_subject(); it must be exactly what was written."""
    lgg = draw_subject_parameters(0, 1, "LGG")  # second LGG
    subject = synthesize_subject(lgg, ALL_CONTRASTS, F)
    for contrast in ALL_CONTRASTS:
        data, image = _load(_brats_file(tree, "LGG", "BraTS19_TCIA09_0004_1", contrast))
        np.testing.assert_array_equal(data, subject.images[contrast])
        np.testing.assert_allclose(image.affine, subject.affine)
    # The default ixi="stripped" writes the stripped brain under IXI's downloaded name.
    healthy = synthesize_subject(draw_subject_parameters(0, 2, "Healthy"), ("t1",), F)
    data, image = _load(tree / "IXI" / "IXI003-IOP-1989-T1.nii.gz")
    np.testing.assert_array_equal(data, healthy.images["t1"])
    np.testing.assert_allclose(image.affine, healthy.affine)


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


# ------------------------------------------------------------------------- unstripped IXI
@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("raw"), 0, 0, 2, seed=0, downsample=F, ixi="raw")


@pytest.fixture(scope="module")
def bet_tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("bet"), 1, 1, 2, seed=0, downsample=F,
                                   ixi="raw+brain")


def test_raw_ixi_is_a_noisy_head_around_the_same_brain(raw_tree: pathlib.Path) -> None:
    paths = _ixi_files(raw_tree)
    assert [p.name for p in paths] == ["IXI001-Guys-1211-T1.nii.gz", "IXI002-HH-1600-T1.nii.gz"]
    for index, path in enumerate(paths):
        data, image = _load(path)
        subject = synthesize_subject(draw_subject_parameters(0, index, "Healthy"), ("t1",), F)
        brain = subject.brain_mask
        np.testing.assert_allclose(image.affine, subject.affine)
        assert data.dtype == np.int16
        # Unstripped: noise everywhere, so the stripping check finds no zero on the faces ...
        assert np.all(_faces(data) != 0)
        assert np.all(data != 0)
        # ... while the brain is voxel for voxel where (and what) the stripped image has it.
        np.testing.assert_array_equal(data[brain], subject.images["t1"][brain])


@pytest.mark.parametrize("index", range(2))
def test_head_has_dark_skull_bright_scalp_then_air(index: int) -> None:
    parameters = draw_subject_parameters(0, index, "Healthy")
    subject = synthesize_subject(parameters, ("t1",), F)
    head = synthesize_head(subject)
    voxel_mm = subject_geometry("ixi", F).voxel_mm
    distance = ndimage.distance_transform_edt(~subject.brain_mask, sampling=voxel_mm)
    bone, scalp = parameters.head.bone_mm, parameters.head.scalp_mm
    brain_level = np.median(head[subject.brain_mask])
    skull_level = np.median(head[(distance > 0) & (distance <= bone)])
    scalp_level = np.median(head[(distance > bone) & (distance <= bone + scalp)])
    air = head[distance > bone + scalp + 10]
    assert scalp_level > 0.5 * brain_level
    assert skull_level < 0.8 * scalp_level
    assert 0 < np.median(air) < 0.1 * brain_level  # Rician noise floor, not exact zeros
    assert np.mean(air < 0.3 * scalp_level) > 0.99  # no tissue far from the brain
    with pytest.raises(ValueError, match="flair"):
        synthesize_head(subject, "flair")


def test_raw_plus_brain_writes_bet_pair(tree: pathlib.Path, raw_tree: pathlib.Path,
                                        bet_tree: pathlib.Path) -> None:
    names = [p.name for p in _ixi_files(bet_tree)]
    assert names == ["IXI001-Guys-1211-T1.nii.gz", "IXI001-Guys-1211-T1_brain.nii.gz",
                     "IXI002-HH-1600-T1.nii.gz", "IXI002-HH-1600-T1_brain.nii.gz"]
    for sid in ("IXI001-Guys-1211", "IXI002-HH-1600"):
        head = bet_tree / "IXI" / f"{sid}-T1.nii.gz"
        brain = bet_tree / "IXI" / f"{sid}-T1_brain.nii.gz"
        # BET's output is the stripped phantom exactly; the head is the "raw" mode's.
        assert brain.read_bytes() == (tree / "IXI" / f"{sid}-T1.nii.gz").read_bytes()
        assert head.read_bytes() == (raw_tree / "IXI" / f"{sid}-T1.nii.gz").read_bytes()
        head_data, brain_data = _load(head)[0], _load(brain)[0]
        np.testing.assert_array_equal(np.where(brain_data != 0, head_data, 0), brain_data)
    # BraTS stays skull-stripped whatever ixi says.
    for path in _brats_files(bet_tree, "HGG", "t1ce") + _brats_files(bet_tree, "LGG", "t1ce"):
        assert np.mean(_faces(_load(path)[0]) == 0) > 0.95  # only a cut brainstem may touch a face


def test_discovery_prefers_bet_files_and_parses_sites(bet_tree: pathlib.Path, raw_tree: pathlib.Path) -> None:
    from datasets.acquisition import border_zero_fraction
    from datasets.sources import discover_brats_ixi

    records = {r.subject_id: r for r in discover_brats_ixi(bet_tree)}
    assert {sid: r.site for sid, r in records.items()} == {
        "BraTS19_CBICA_0001_1": "CBICA", "BraTS19_TCIA10_0002_1": "TCIA10",
        "IXI001-Guys-1211": "Guys", "IXI002-HH-1600": "HH",
    }
    assert records["IXI001-Guys-1211"].paths[0].endswith("-T1_brain.nii.gz")
    (raw,) = [r for r in discover_brats_ixi(raw_tree) if r.subject_id == "IXI001-Guys-1211"]
    # What the skull-stripping check measures: ~all zero faces when stripped, none when raw.
    assert border_zero_fraction(_load(pathlib.Path(raw.paths[0]))[0]) == 0.0
    assert border_zero_fraction(_load(pathlib.Path(records["IXI001-Guys-1211"].paths[0]))[0]) > 0.95


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
        ({"ixi": "bet"}, r"ixi must be one of \('stripped', 'raw', 'raw\+brain'\)"),
        ({"ixi": None}, "ixi"),
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
