"""Synthetic BraTS-2019 + IXI shaped data: the embedded demo data and the test fixture.

The real data sets cannot be redistributed, yet the pipeline (file discovery, resampling of two
differently oriented sources, intensity normalisation, training) has to run end to end in CI and
in a demo. This module therefore writes a small tree that *looks* like the two sources on disk
(folder layout, file names, voxel grids, orientations, integer intensities of two scanners) and
whose three classes differ the way the real ones do, strongly enough for a small 3-D CNN to learn
them at 8 mm:

* HGG: a lumpy enhancing lesion -- bright rim in t1ce, dark necrotic core, oedema around it;
* LGG: a homogeneous, non-enhancing, T1-hypointense (FLAIR-hyperintense) mass;
* Healthy: no lesion (IXI-like file, T1 only).

BraTS subjects are named like the release, ``BraTS19_<site>_<nnnn>_1``, with the contributing
site drawn from a per-grade cycle (:data:`BRATS_SITES`) so that site and grade are confounded the
way they are in BraTS 2019. BraTS volumes are always skull-stripped, as released. IXI was released
as raw heads and is usually stripped with FSL BET by the user, so :func:`write_synthetic_dataset`
can write IXI either way (``ixi=``): ``"stripped"`` (brain only, exact-zero background),
``"raw"`` (a head: dark skull and bright scalp around the brain, Rician noise over the whole field
of view) or ``"raw+brain"`` (both, named as BET leaves them side by side). Unstripped and mixed
trees are what the pipeline's skull-stripping check and its BET-file preference must handle.

Anatomy comes from the MNI152 (ICBM 2009a, symmetric) template shipped inside the nilearn wheel,
so nothing is downloaded. Each subject is the template warped by a random affine + smooth
displacement, with a random bias field, global intensity scale and Rician noise.

Like TorchIO transforms, randomness is confined to one place: :func:`draw_subject_parameters`
returns a :class:`SubjectParameters` (from ``numpy.random.default_rng([seed, class, index])``,
so a subject does not depend on how many others are generated), and :func:`synthesize_subject`
applies it deterministically.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import math
import os
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage, special

logger = logging.getLogger(__name__)

CLASSES = ("HGG", "LGG", "Healthy")
CONTRASTS = ("t1", "t1ce", "flair")
BRATS_DIRNAME = "MICCAI_BraTS_2019_Data_Training"
IXI_DIRNAME = "IXI"
IXI_SITES = ("Guys", "HH", "IOP")
# Contributing sites per grade, cycled with the index within the grade. BraTS 2019 is imbalanced
# (CBICA sent only HGG, the TCIA LGG collections mostly LGG, the 2013 challenge data both), and a
# site/grade confound is exactly what site-aware analyses must be able to see in the demo data.
BRATS_SITES = {"HGG": ("CBICA", "CBICA", "TCIA02", "2013"), "LGG": ("TCIA10", "TCIA09", "2013")}
# How IXI phantoms are written: BET output, the head as downloaded, or both side by side.
IXI_MODES = ("stripped", "raw", "raw+brain")
# BraTS segmentation codes, reused for the in-memory label map so tests speak the BraTS language.
LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING = 1, 2, 4

_MAX_IXI_SUBJECTS = 999  # IXI ids have three digits
_MAX_BRATS_SUBJECTS = 9999  # BraTS19_<site>_<nnnn>_1
_DCT_SIZE = 4  # cosine frequencies 0..3 per axis: enough for smooth, brain-scale fields
_DCT_BOX_MM = (-120.0, 120.0)  # fields live in world mm, so the same subject is the same anatomy
_GZIP_LEVEL = 6


# --------------------------------------------------------------------------------------------
# Drawn parameters
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Lumps:
    """Directional irregularity ``sum_k a_k cos(f_k <v_k, u> + phi_k)`` of a unit direction ``u``.

    Low frequencies of the direction give a few smooth bulges: cheap, and irregular enough that
    lesions are not perfect spheres.
    """

    directions: np.ndarray  # (K, 3) unit vectors
    frequencies: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K,)

    def __call__(self, unit: np.ndarray) -> np.ndarray:
        dtype = unit.dtype
        arg = unit @ self.directions.T.astype(dtype) * self.frequencies.astype(dtype)
        arg += self.phases.astype(dtype)
        return np.cos(arg, out=arg) @ self.amplitudes.astype(dtype)

    @property
    def max_abs(self) -> float:
        return float(np.abs(self.amplitudes).sum())


@dataclasses.dataclass(frozen=True)
class Appearance:
    """Relative intensities (white matter of the template = 1) of lesion compartments in one contrast.

    Oedema keeps some of the underlying anatomy (``gain * healthy + offset``), whereas solid
    tumour and necrosis replace it.
    """

    oedema_gain: float
    oedema_offset: float
    tumour: float  # HGG: enhancing rim; LGG: the mass itself
    core: float  # HGG necrosis; unused for LGG


@dataclasses.dataclass(frozen=True, eq=False)
class LesionParameters:
    """Shape, position (template/MNI mm) and appearance of one lesion."""

    kind: str  # "HGG" or "LGG"
    centre_mm: np.ndarray  # (3,) in template world coordinates
    radius_mm: float  # solid tumour (HGG: outer edge of the enhancing rim)
    oedema_ratio: float  # outer oedema radius / radius_mm; 1 means no oedema
    core_fraction: float  # necrotic core radius / radius_mm; 0 means no core
    shape_matrix: np.ndarray  # (3, 3) rotation + anisotropic scaling (det 1) of the ellipsoid
    outline: Lumps
    oedema_outline: Lumps
    core_outline: Lumps
    texture: Lumps  # relative modulation of the tumour intensity along its surface
    appearance: dict[str, Appearance]  # for every contrast in CONTRASTS

    @property
    def extent_mm(self) -> float:
        """Radius of a sphere around the centre that surely contains every lesion voxel."""
        return self.radius_mm * max(
            self.oedema_ratio * (1 + self.oedema_outline.max_abs), 1 + self.outline.max_abs
        )


@dataclasses.dataclass(frozen=True)
class HeadParameters:
    """Tissue outside the brain of an unstripped head, as shells at a distance from the brain.

    On T1, CSF, dura and the skull's cortical bone are dark and the scalp (mostly fat) is bright;
    beyond the scalp is air, i.e. noise only. Shells grown from the subject's own brain mask
    follow its pose and shape for free, which is all a skull-stripping check and a BET-like mask
    need; the exact anatomy of a head does not matter here.
    """

    bone_mm: float  # dark layer between brain and scalp (CSF, dura, skull)
    scalp_mm: float  # bright layer outside the skull
    scalp_level: float  # scalp intensity relative to white matter


@dataclasses.dataclass(frozen=True, eq=False)
class SubjectParameters:
    """Everything random about one subject; applying it (:func:`synthesize_subject`) is deterministic."""

    seed: int
    index: int
    label: str
    source: str  # "brats" or "ixi": decides grid, orientation and scanner intensity scale
    linear: np.ndarray  # (3, 3) subject -> template linear part (rotation @ scaling)
    translation_mm: np.ndarray  # (3,)
    displacement_coefs: np.ndarray  # (3, K, K, K) DCT coefficients, mm, world axis order
    bias_coefs: dict[str, np.ndarray]  # per contrast (K, K, K) log-bias DCT coefficients
    scales: dict[str, float]  # per contrast: intensity of white matter on this "scanner"
    noise_fraction: float  # Rician sigma relative to the white-matter intensity
    noise_seed: int
    lesion: LesionParameters | None
    head: HeadParameters  # only rendered for unstripped IXI files (synthesize_head)


def draw_subject_parameters(seed: int, index: int, label: str) -> SubjectParameters:
    """Draws all random parameters of subject ``index`` (0-based, within its class ``label``).

    The generator is seeded with ``[seed, class, index]`` so that e.g. LGG subject 3 is the same
    whatever ``n_hgg`` or ``n_healthy`` are.
    """
    _check_seed(seed)
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([int(seed), CLASSES.index(label), int(index)])
    source = "ixi" if label == "Healthy" else "brats"
    # IXI heads were scanned in native space; BraTS volumes were co-registered to an atlas, so
    # their pose varies less.
    max_angle_deg, max_shift_mm = (8.0, 8.0) if source == "ixi" else (4.0, 4.0)
    angles = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg, size=3))
    head_scale = rng.uniform(0.94, 1.06, size=3)
    translation = rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    displacement = np.stack([_draw_dct_coefs(rng, std=0.9, max_order=3) for _ in range(3)])
    bias = {c: _draw_dct_coefs(rng, std=0.05, max_order=2) for c in CONTRASTS}
    scale_ranges = _SCANNER_SCALES[source]
    scales = {c: float(rng.uniform(*scale_ranges[c])) for c in CONTRASTS}
    noise_fraction = float(rng.uniform(*_NOISE_FRACTION[source]))
    noise_seed = int(rng.integers(0, 2**62))
    lesion = None
    if label == "HGG":
        lesion = _draw_hgg_lesion(rng)
    elif label == "LGG":
        lesion = _draw_lgg_lesion(rng)
    # Drawn last so that every earlier draw, hence every stripped image, is what it was before
    # heads existed.
    head = HeadParameters(
        bone_mm=float(rng.uniform(4.0, 8.0)),
        scalp_mm=float(rng.uniform(4.0, 8.0)),
        scalp_level=float(rng.uniform(0.8, 1.2)),
    )
    return SubjectParameters(
        seed=int(seed),
        index=int(index),
        label=label,
        source=source,
        linear=_rotation(angles) @ np.diag(head_scale),
        translation_mm=translation,
        displacement_coefs=displacement,
        bias_coefs=bias,
        scales=scales,
        noise_fraction=noise_fraction,
        noise_seed=noise_seed,
        lesion=lesion,
        head=head,
    )


# White-matter intensity per scanner: BraTS and IXI come from different scanners and
# pre-processing, so their raw scales differ and the pipeline must normalise intensities.
_SCANNER_SCALES = {
    "brats": {"t1": (300.0, 600.0), "t1ce": (450.0, 900.0), "flair": (250.0, 500.0)},
    "ixi": {"t1": (110.0, 260.0), "t1ce": (110.0, 260.0), "flair": (110.0, 260.0)},
}
_NOISE_FRACTION = {"brats": (0.015, 0.04), "ixi": (0.02, 0.05)}


def _draw_hgg_lesion(rng: np.random.Generator) -> LesionParameters:
    # Whole lesion (oedema included) 20-35 mm in radius; the enhancing tumour is its inner part.
    whole_radius = rng.uniform(20.0, 35.0)
    oedema_ratio = rng.uniform(1.3, 1.7)
    radius = whole_radius / oedema_ratio
    rim_thickness = rng.uniform(4.0, 8.0)
    core_fraction = float(np.clip(1.0 - rim_thickness / radius, 0.3, 0.75))
    centre = _draw_lesion_centre(rng, min_depth_mm=0.7 * radius)
    appearance = {
        # Gadolinium makes the viable rim the brightest tissue in the brain (t1ce only).
        "t1ce": Appearance(
            oedema_gain=rng.uniform(0.75, 0.88),
            oedema_offset=0.0,
            tumour=rng.uniform(1.5, 2.0),
            core=rng.uniform(0.15, 0.35),
        ),
        # Without contrast the same rim is mildly hypointense tumour tissue.
        "t1": Appearance(
            oedema_gain=rng.uniform(0.75, 0.88),
            oedema_offset=0.0,
            tumour=rng.uniform(0.5, 0.68),
            core=rng.uniform(0.15, 0.35),
        ),
        # FLAIR: oedema is the hallmark hyperintensity; anatomy shows faintly through it.
        "flair": Appearance(
            oedema_gain=0.3,
            oedema_offset=rng.uniform(1.05, 1.3),
            tumour=rng.uniform(1.0, 1.25),
            core=rng.uniform(0.5, 0.9),
        ),
    }
    return LesionParameters(
        kind="HGG",
        centre_mm=centre,
        radius_mm=float(radius),
        oedema_ratio=float(oedema_ratio),
        core_fraction=core_fraction,
        shape_matrix=_draw_shape_matrix(rng),
        outline=_draw_lumps(rng, amplitude=0.09),
        # Oedema spreads along white matter, so its border is the most irregular.
        oedema_outline=_draw_lumps(rng, amplitude=0.1, count=6, max_frequency=7.0),
        core_outline=_draw_lumps(rng, amplitude=0.08, max_frequency=6.0),
        texture=_draw_lumps(rng, amplitude=0.05, max_frequency=8.0),
        appearance=appearance,
    )


def _draw_lgg_lesion(rng: np.random.Generator) -> LesionParameters:
    radius = rng.uniform(15.0, 30.0)
    centre = _draw_lesion_centre(rng, min_depth_mm=0.7 * radius)
    t1_value = rng.uniform(0.35, 0.52)
    # LGGs infiltrate diffusely: a thin, mildly T1-hypo / FLAIR-hyperintense margin (label 2),
    # without the large vasogenic oedema of an HGG.
    margin_gain = rng.uniform(0.8, 0.9)
    appearance = {
        "t1": Appearance(oedema_gain=margin_gain, oedema_offset=0.0, tumour=t1_value, core=t1_value),
        # Non-enhancing: t1ce barely differs from t1.
        "t1ce": Appearance(
            oedema_gain=margin_gain,
            oedema_offset=0.0,
            tumour=t1_value * rng.uniform(1.0, 1.06),
            core=t1_value,
        ),
        "flair": Appearance(
            oedema_gain=0.4, oedema_offset=rng.uniform(0.6, 0.8), tumour=rng.uniform(1.3, 1.6),
            core=1.0,
        ),
    }
    return LesionParameters(
        kind="LGG",
        centre_mm=centre,
        radius_mm=float(radius),
        oedema_ratio=float(rng.uniform(1.1, 1.25)),
        core_fraction=0.0,
        shape_matrix=_draw_shape_matrix(rng),
        outline=_draw_lumps(rng, amplitude=0.08),
        oedema_outline=_draw_lumps(rng, amplitude=0.05),
        core_outline=_draw_lumps(rng, amplitude=0.0),
        texture=_draw_lumps(rng, amplitude=0.01),  # "fairly homogeneous"
        appearance=appearance,
    )


def _draw_lesion_centre(rng: np.random.Generator, min_depth_mm: float) -> np.ndarray:
    """A point of one hemisphere at least ``min_depth_mm`` inside the brain (template mm)."""
    template = _template()
    depths = template.candidate_depth_mm
    threshold = min(min_depth_mm, 0.9 * float(depths[-1]))
    start = int(np.searchsorted(depths, threshold))
    centre = template.candidate_mm[rng.integers(start, len(depths))] + rng.uniform(-1, 1, 3)
    # Candidates are right-hemisphere points of a left-right symmetric template: mirroring
    # gives the left hemisphere for free.
    if rng.random() < 0.5:
        centre[0] = -centre[0]
    return centre


def _draw_lumps(
    rng: np.random.Generator, amplitude: float, count: int = 4, max_frequency: float = 4.5
) -> Lumps:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return Lumps(
        directions=directions,
        frequencies=rng.uniform(2.0, max_frequency, size=count),
        phases=rng.uniform(0, 2 * np.pi, size=count),
        amplitudes=amplitude * rng.uniform(0.5, 1.5, size=count),
    )


def _draw_shape_matrix(rng: np.random.Generator) -> np.ndarray:
    """Maps lesion-centred mm to a frame where the lesion is roughly spherical (det 1)."""
    axes = rng.uniform(0.8, 1.25, size=3)
    axes /= np.prod(axes) ** (1 / 3)
    rotation = _rotation(rng.uniform(-np.pi, np.pi, size=3))
    return np.diag(1 / axes) @ rotation.T


def _draw_dct_coefs(rng: np.random.Generator, std: float, max_order: int) -> np.ndarray:
    """Random low-frequency cosine coefficients; the constant term is left to other parameters."""
    k = np.arange(_DCT_SIZE)
    order = k[:, None, None] + k[None, :, None] + k[None, None, :]
    keep = (order >= 1) & (order <= max_order)
    return rng.normal(0.0, std, size=order.shape) * keep


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------
# Template (MNI152 inside the nilearn wheel)
# --------------------------------------------------------------------------------------------
def mni_template_path(kind: str = "t1") -> pathlib.Path:
    """Path of the MNI152 2009a map ``kind`` ('t1', 'gm' or 'wm') shipped with nilearn."""
    import nilearn  # local import: only needed when data is generated

    name = f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return pathlib.Path(nilearn.__file__).parent / "datasets" / "data" / name


@dataclasses.dataclass(frozen=True, eq=False)
class _Template:
    t1: np.ndarray  # float32, white matter ~ 1, 0 outside the brain
    flair: np.ndarray  # float32, grey matter ~ 1
    mask: np.ndarray  # float32 in {0, 1}
    voxel_mm: np.ndarray  # (3,) axis-aligned template grid: voxel = (world - origin) / voxel_mm
    origin_mm: np.ndarray  # (3,)
    centre_mm: np.ndarray  # centre of the brain's bounding box
    candidate_mm: np.ndarray  # (N, 3) right-hemisphere lesion centres ...
    candidate_depth_mm: np.ndarray  # (N,) ... sorted by distance to the brain surface


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Loads the template once per process (~1 s): every subject starts from it."""
    t1_img = nib.load(mni_template_path("t1"))
    affine = t1_img.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise RuntimeError("expected an axis-aligned MNI template")
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(mni_template_path("gm")).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(mni_template_path("wm")).dataobj, dtype=np.float32) / 255.0
    # nilearn's T1 is already brain-extracted (0 outside; CSF included; one hole-free component),
    # so its support is the best brain mask; the gm/wm maps stop short of sulcal CSF.
    mask = t1 > 0
    white_matter_level = float(np.median(t1[wm > 0.9]))
    t1 = np.where(mask, t1 / white_matter_level, 0).astype(np.float32)
    # FLAIR is not in the template: compose it from tissue maps (GM > WM >> CSF).
    csf = np.clip(mask - gm - wm, 0, 1)
    flair = np.where(mask, 1.0 * gm + 0.7 * wm + 0.15 * csf, 0).astype(np.float32)
    voxel = np.diag(affine)[:3].astype(float)
    origin = affine[:3, 3].astype(float)
    centre = origin + voxel * np.array([_support_middle(mask, axis) for axis in range(3)])
    candidates, depths = _lesion_candidates(mask, voxel, origin)
    return _Template(
        t1=t1,
        flair=flair,
        mask=mask.astype(np.float32),
        voxel_mm=voxel,
        origin_mm=origin,
        centre_mm=centre,
        candidate_mm=candidates,
        candidate_depth_mm=depths,
    )


def _support_middle(mask: np.ndarray, axis: int) -> float:
    """Middle (in voxels) of the range of indices along ``axis`` where ``mask`` has any voxel."""
    others = tuple(a for a in range(mask.ndim) if a != axis)
    present = np.flatnonzero(mask.any(axis=others))
    return (present[0] + present[-1]) / 2


def _lesion_candidates(
    mask: np.ndarray, voxel: np.ndarray, origin: np.ndarray, step: int = 2, midline_mm: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    # A 2 mm grid is plenty for choosing centres and makes the distance transform cheap.
    coarse = mask[::step, ::step, ::step]
    depth = ndimage.distance_transform_edt(coarse, sampling=voxel * step)
    idx = np.argwhere(coarse)
    world = origin + voxel * step * idx
    keep = world[:, 0] > midline_mm  # one hemisphere, away from the falx
    world, d = world[keep], depth[coarse][keep]
    order = np.argsort(d, kind="stable")
    return world[order], d[order]


@functools.lru_cache(maxsize=2)
def _template_volumes(downsample: float) -> dict[str, np.ndarray]:
    """Template volumes pre-blurred to the output voxel size (partial volume of a coarser scan)."""
    template = _template()
    sigma_mm = 0.35 * math.sqrt(max(downsample**2 - 1.0, 0.0))
    volumes = {"t1": template.t1, "flair": template.flair, "mask": template.mask}
    if sigma_mm > 0:
        sigma = sigma_mm / template.voxel_mm
        volumes = {k: ndimage.gaussian_filter(v, sigma) for k, v in volumes.items()}
    return volumes


# --------------------------------------------------------------------------------------------
# Output grids
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """An axis-aligned voxel grid: ``shape`` and voxel-to-world ``affine`` (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def world_axes(self) -> list[np.ndarray]:
        """World coordinate along each world axis (x, y, z), shaped to broadcast over the grid.

        Because the grid is axis-aligned, each world coordinate depends on one voxel axis only;
        this keeps coordinate maps and smooth fields separable and therefore cheap.
        """
        linear = self.affine[:3, :3]
        axes: list[np.ndarray] = [np.empty(0)] * 3
        for voxel_axis in range(3):
            (world_axis,) = np.flatnonzero(linear[:, voxel_axis])
            coords = linear[world_axis, voxel_axis] * np.arange(self.shape[voxel_axis])
            coords = coords + self.affine[world_axis, 3]
            broadcast = [1, 1, 1]
            broadcast[voxel_axis] = -1
            axes[world_axis] = coords.reshape(broadcast)
        return axes


# Column e = world direction of voxel axis e.
_LPS = np.diag([-1.0, -1.0, 1.0])
_PSR = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
_GRIDS = {
    # BraTS: 240 x 240 x 155 at 1 mm, LPS, brain in the middle of the field of view. 155 mm is
    # about the template's height including the brainstem, so the centre sits 10 mm above the
    # brain centre: the lower brainstem is cut (as in many BraTS cases), the vertex never.
    "brats": ((240, 240, 155), (1.0, 1.0, 1.0), _LPS, np.array([0.0, 0.0, 10.0])),
    # IXI T1: sagittal 256 x 256 x 150, 0.9375 x 0.9375 x 1.2 mm, the 1.2 mm axis left-right,
    # stored PSR. The FOV also covers the neck, so the brain sits in its upper part.
    "ixi": ((256, 256, 150), (0.9375, 0.9375, 1.2), _PSR, np.array([0.0, 0.0, -20.0])),
}


def subject_geometry(source: str, downsample: float = 1.0) -> Geometry:
    """The voxel grid of ``source`` ('brats' or 'ixi') with voxels ``downsample`` times larger."""
    shape, voxel, directions, offset = _GRIDS[source]
    new_shape = tuple(max(8, int(math.floor(n / downsample + 0.5))) for n in shape)
    linear = directions * (np.asarray(voxel) * downsample)
    centre_voxel = (np.asarray(new_shape) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = _template().centre_mm + offset - linear @ centre_voxel
    return Geometry(shape=new_shape, affine=affine)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSubject:
    """One rendered subject: integer images per contrast, the grid, and ground truth."""

    parameters: SubjectParameters
    images: dict[str, np.ndarray]  # int16, 0 outside the brain
    affine: np.ndarray
    brain_mask: np.ndarray  # bool
    labels: np.ndarray  # uint8 with BraTS codes: 0, 1 necrosis/non-enhancing, 2 oedema, 4 enhancing


def synthesize_subject(
    parameters: SubjectParameters, contrasts: Sequence[str] = ("t1ce",), downsample: float = 1.0
) -> SyntheticSubject:
    """Renders ``parameters`` on its source's grid; deterministic, no randomness is drawn here."""
    contrasts = _check_contrasts(contrasts)
    downsample = _check_downsample(downsample)
    geometry = subject_geometry(parameters.source, downsample)
    volumes = _template_volumes(downsample)
    coords = _template_coordinates(parameters, geometry)
    template = _template()
    for d in range(3):  # template world mm -> template voxel indices, in place to save memory
        coords[d] -= template.origin_mm[d]
        coords[d] /= template.voxel_mm[d]
    # Only about a fifth of the field of view is brain: sample everything else there only.
    mask = _sample(volumes["mask"], coords) > 0.5
    inside = coords[:, mask]
    lesion = None
    if parameters.lesion is not None:
        inside_mm = inside * template.voxel_mm[:, None] + template.origin_mm[:, None]
        inside_mm = inside_mm.astype(np.float32)
        soft_mm = max(0.5, 0.35 * downsample)
        lesion = _lesion_weights(parameters.lesion, inside_mm, soft_mm)
    healthy: dict[str, np.ndarray] = {}
    images = {}
    for contrast in contrasts:
        base = "flair" if contrast == "flair" else "t1"
        if base not in healthy:
            healthy[base] = _sample(volumes[base], inside)
        relative = healthy[base]
        if lesion is not None:
            relative = _apply_lesion(relative, lesion, parameters.lesion.appearance[contrast])
        bias = np.exp(_smooth_field(parameters.bias_coefs[contrast], geometry)[mask])
        scale = parameters.scales[contrast]
        noise_rng = np.random.default_rng([parameters.noise_seed, CONTRASTS.index(contrast)])
        values = _rician(scale * bias * relative, parameters.noise_fraction * scale, noise_rng)
        images[contrast] = _to_volume(_quantize(values), mask)
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    if lesion is not None:
        labels[mask] = _label_codes(lesion, parameters.lesion.kind, int(mask.sum()))
    return SyntheticSubject(
        parameters=parameters, images=images, affine=geometry.affine, brain_mask=mask, labels=labels
    )


def _template_coordinates(parameters: SubjectParameters, geometry: Geometry) -> np.ndarray:
    """Template world mm of every output voxel: affine pose + smooth displacement field.

    float32 halves memory and time at 1 mm; 1e-5 mm precision is irrelevant here.
    """
    world = geometry.world_axes()
    centre = _template().centre_mm
    linear = parameters.linear
    coords = np.empty((3, *geometry.shape), dtype=np.float32)
    for d in range(3):
        coords[d] = centre[d] + parameters.translation_mm[d]
        for e in range(3):
            coords[d] += (linear[d, e] * (world[e] - centre[e])).astype(np.float32)
        coords[d] += _smooth_field(parameters.displacement_coefs[d], geometry)
    return coords


def _smooth_field(coefs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Evaluates a 3-D cosine series (world axis order) on the grid as a separable tensor product."""
    lo, hi = _DCT_BOX_MM
    k = np.arange(coefs.shape[0])
    world = geometry.world_axes()
    voxel_to_world_axis = [int(np.flatnonzero(geometry.affine[:3, e])[0]) for e in range(3)]
    bases = []
    for e, d in enumerate(voxel_to_world_axis):
        u = (world[d].ravel() - lo) / (hi - lo)
        bases.append(np.cos(np.pi * np.outer(u, k)).astype(np.float32))
    coefs_voxel_order = np.transpose(coefs, voxel_to_world_axis).astype(np.float32)
    return np.einsum("abc,ia,jb,kc->ijk", coefs_voxel_order, *bases, optimize="greedy")


def _sample(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0,
                                   output=np.float32, prefilter=False)


@dataclasses.dataclass(frozen=True, eq=False)
class _LesionWeights:
    """Soft compartment memberships (sum <= 1) of the brain voxels near the lesion."""

    index: np.ndarray  # positions in the brain-voxel vector
    oedema: np.ndarray
    tumour: np.ndarray
    core: np.ndarray
    texture: np.ndarray


def _lesion_weights(lesion: LesionParameters, points_mm: np.ndarray, soft_mm: float) -> _LesionWeights:
    """Soft lesion compartments at ``points_mm`` (3, N) given in template world mm.

    Working in template space lets the lesion deform with the anatomy. Edges are sigmoids a
    voxel or so wide, which mimics partial volume and avoids aliasing at coarse resolutions.
    """
    offset = points_mm - lesion.centre_mm[:, None].astype(points_mm.dtype)
    # |S x| >= s_min |x|, so every lesion voxel lies within extent / s_min of the centre: only
    # that ball (a few % of the brain) is evaluated.
    s_min = np.linalg.svd(lesion.shape_matrix, compute_uv=False).min()
    reach = (lesion.extent_mm + 6 * soft_mm) / s_min
    index = np.flatnonzero(np.all(np.abs(offset) < reach, axis=0))
    index = index[np.einsum("dn,dn->n", offset[:, index], offset[:, index]) < reach**2]
    local = (lesion.shape_matrix.astype(points_mm.dtype) @ offset[:, index]).T
    distance = np.linalg.norm(local, axis=1)
    unit = local / np.maximum(distance, 1e-6)[:, None]
    tumour_radius = lesion.radius_mm * (1 + lesion.outline(unit))
    oedema_radius = np.maximum(
        lesion.radius_mm * lesion.oedema_ratio * (1 + lesion.oedema_outline(unit)), tumour_radius
    )
    inside_tumour = special.expit((tumour_radius - distance) / soft_mm)
    inside_all = special.expit((oedema_radius - distance) / soft_mm)
    if lesion.core_fraction > 0:
        core_radius = lesion.radius_mm * lesion.core_fraction * (1 + lesion.core_outline(unit))
        inside_core = special.expit((core_radius - distance) / soft_mm)
    else:
        inside_core = np.zeros_like(distance)
    return _LesionWeights(
        index=index,
        oedema=np.clip(inside_all - inside_tumour, 0, 1),
        tumour=inside_tumour * (1 - inside_core),
        core=inside_tumour * inside_core,
        texture=lesion.texture(unit),
    )


def _apply_lesion(healthy: np.ndarray, weights: _LesionWeights, look: Appearance) -> np.ndarray:
    out = healthy.copy()
    h = healthy[weights.index]
    lesion_total = weights.oedema + weights.tumour + weights.core
    out[weights.index] = (
        h * (1 - lesion_total)
        + (look.oedema_gain * h + look.oedema_offset) * weights.oedema
        + look.tumour * (1 + weights.texture) * weights.tumour
        + look.core * weights.core
    )
    return out


def _label_codes(weights: _LesionWeights, kind: str, n_brain: int) -> np.ndarray:
    """Hard labels (BraTS codes) of all brain voxels from the soft memberships (majority)."""
    codes = np.array([0, LABEL_OEDEMA, LABEL_ENHANCING if kind == "HGG" else LABEL_NECROSIS,
                      LABEL_NECROSIS], dtype=np.uint8)
    background = 1 - (weights.oedema + weights.tumour + weights.core)
    winner = np.argmax(np.stack([background, weights.oedema, weights.tumour, weights.core]), axis=0)
    labels = np.zeros(n_brain, dtype=np.uint8)
    labels[weights.index] = codes[winner]
    return labels


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise: what MR magnitude images contain."""
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imaginary)


def _quantize(values: np.ndarray) -> np.ndarray:
    """Rounds to int16 like the scanners' DICOMs behind BraTS and IXI.

    Integers keep files small and make the loader's cast to float a tested path; >= 1 keeps
    every brain voxel positive so "non-zero" keeps meaning "brain", as after skull stripping.
    """
    return np.clip(np.rint(values), 1, np.iinfo(np.int16).max).astype(np.int16)


def _to_volume(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    volume = np.zeros(mask.shape, dtype=values.dtype)
    volume[mask] = values
    return volume


_BONE_LEVEL = 0.08  # CSF + cortical bone on T1, relative to white matter: nearly black
_HEAD_NOISE_STREAM = 1  # keeps the head's noise independent of the brain's ([noise_seed, contrast])


def synthesize_head(subject: SyntheticSubject, contrast: str = "t1") -> np.ndarray:
    """The unstripped head around ``subject``'s brain: the image before skull stripping.

    Brain voxels are copied unchanged, so masking the head with the brain mask (which is what BET
    writes) gives ``subject.images[contrast]`` back exactly. Outside the brain, a dark skull and a
    bright scalp (:class:`HeadParameters`) sit at a distance from the brain mask, so they follow
    the subject's pose; the same bias field and scanner scale apply, and Rician noise covers the
    whole field of view, so no voxel is exactly zero, as in a magnitude image. Deterministic: the
    noise comes from the subject's ``noise_seed``.
    """
    if contrast not in subject.images:
        raise ValueError(f"contrast {contrast!r} was not rendered; subject has {tuple(subject.images)}")
    parameters = subject.parameters
    geometry = Geometry(shape=subject.brain_mask.shape, affine=subject.affine)
    outside = ~subject.brain_mask
    distance = ndimage.distance_transform_edt(outside, sampling=geometry.voxel_mm)[outside]
    # About half a voxel of partial volume at each shell's edge, as for lesions.
    soft_mm = max(0.5, 0.4 * min(geometry.voxel_mm))
    relative = _head_tissue(parameters.head, distance.astype(np.float32), soft_mm)
    bias = np.exp(_smooth_field(parameters.bias_coefs[contrast], geometry)[outside])
    scale = parameters.scales[contrast]
    noise_rng = np.random.default_rng(
        [parameters.noise_seed, CONTRASTS.index(contrast), _HEAD_NOISE_STREAM]
    )
    values = _rician(scale * bias * relative, parameters.noise_fraction * scale, noise_rng)
    head = subject.images[contrast].copy()
    head[outside] = _quantize(values)
    return head


def _head_tissue(head: HeadParameters, distance_mm: np.ndarray, soft_mm: float) -> np.ndarray:
    """Relative T1 signal at ``distance_mm`` from the brain: dark bone, then bright scalp, then air."""
    within_bone = special.expit((head.bone_mm - distance_mm) / soft_mm)
    within_scalp = special.expit((head.bone_mm + head.scalp_mm - distance_mm) / soft_mm)
    return _BONE_LEVEL * within_bone + head.scalp_level * (within_scalp - within_bone)


# --------------------------------------------------------------------------------------------
# Writing the tree
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlannedSubject:
    """Where one subject goes: its class, index within the class, id and files per contrast.

    ``files`` receive the skull-stripped image, ``head_files`` the unstripped head
    (:func:`synthesize_head`); an IXI subject in ``"raw+brain"`` mode has both.
    """

    label: str
    index: int
    subject_id: str
    files: dict[str, pathlib.Path]
    head_files: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)

    @property
    def contrasts(self) -> tuple[str, ...]:
        """Every contrast that has to be rendered for this subject's files."""
        return tuple(dict.fromkeys([*self.files, *self.head_files]))


def plan_dataset(
    out_dir: str | os.PathLike, n_hgg: int, n_lgg: int, n_healthy: int,
    contrasts: Sequence[str] = ("t1ce",), ixi: str = "stripped",
) -> list[PlannedSubject]:
    """File names of the tree :func:`write_synthetic_dataset` writes, without writing anything."""
    _check_counts(n_hgg, n_lgg, n_healthy)
    contrasts = _check_contrasts(contrasts)
    _check_ixi(ixi)
    root = pathlib.Path(out_dir)
    plan = []
    number = 0  # unique over the whole tree, so an id names one subject even without its grade
    for label, count in (("HGG", n_hgg), ("LGG", n_lgg)):
        for index in range(count):
            number += 1
            sid = brats_subject_id(label, index, number)
            folder = root / BRATS_DIRNAME / label / sid
            files = {c: folder / f"{sid}_{c}.nii.gz" for c in contrasts}
            plan.append(PlannedSubject(label, index, sid, files))
    for index in range(n_healthy):
        plan.append(_plan_ixi_subject(root / IXI_DIRNAME, index, ixi))
    return plan


def _plan_ixi_subject(folder: pathlib.Path, index: int, ixi: str) -> PlannedSubject:
    """IXI's raw head keeps the download's name; BET's output adds ``_brain``, as FSL names it."""
    sid = ixi_subject_id(index)
    downloaded = {"t1": folder / f"{sid}-T1.nii.gz"}
    if ixi == "stripped":
        # Stripped data under the downloaded name: what the project has always generated.
        return PlannedSubject("Healthy", index, sid, files=downloaded)
    if ixi == "raw":
        return PlannedSubject("Healthy", index, sid, files={}, head_files=downloaded)
    brain = {"t1": folder / f"{sid}-T1_brain.nii.gz"}
    return PlannedSubject("Healthy", index, sid, files=brain, head_files=downloaded)


def brats_subject_id(grade: str, index: int, number: int) -> str:
    """``BraTS19_<site>_<nnnn>_1``, shaped like the release's ``BraTS19_CBICA_AAB_1``.

    The site cycles through ``BRATS_SITES[grade]`` with ``index`` (0-based, within the grade), so
    the per-site grade imbalance of BraTS 2019 is reproduced and does not depend on how many
    subjects of the other grade there are. ``number`` (1..9999) is the caller's running number:
    real sites number their own cases, but a tree-wide number keeps ids unique even where two
    sites (2013) contribute to both grades.
    """
    if grade not in BRATS_SITES:
        raise ValueError(f"grade must be one of {tuple(BRATS_SITES)}, got {grade!r}")
    if not 1 <= number <= _MAX_BRATS_SUBJECTS:
        raise ValueError(f"number must be in 1..{_MAX_BRATS_SUBJECTS} (4 digits), got {number}")
    sites = BRATS_SITES[grade]
    return f"BraTS19_{sites[index % len(sites)]}_{number:04d}_1"


def ixi_subject_id(index: int) -> str:
    """``IXI<nnn>-<Site>-<nnnn>``: sites cycle; the 4-digit number is a unique scrambled id."""
    site = IXI_SITES[index % len(IXI_SITES)]
    # 389 is coprime with 9000, so the numbers are unique for every possible index.
    return f"IXI{index + 1:03d}-{site}-{1000 + (211 + 389 * index) % 9000:04d}"


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_hgg: int,
    n_lgg: int,
    n_healthy: int,
    seed: int = 0,
    downsample: float = 1.0,
    contrasts: tuple[str, ...] = ("t1ce",),
    ixi: str = "stripped",
) -> pathlib.Path:
    """Writes the tree under out_dir and returns out_dir as a Path.

    Layout (names are what the data-discovery code globs for)::

        out_dir/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<sid>/<sid>_<contrast>.nii.gz
        out_dir/IXI/IXI<nnn>-<Site>-<nnnn>-T1.nii.gz        (Healthy, T1 only)
        out_dir/IXI/IXI<nnn>-<Site>-<nnnn>-T1_brain.nii.gz  (ixi="raw+brain" only)

    ``<sid>`` is ``BraTS19_<site>_<nnnn>_1`` (:func:`brats_subject_id`); numbers run over HGG
    then LGG. BraTS volumes are skull-stripped. ``ixi`` (one of :data:`IXI_MODES`) says what the
    IXI files hold:

    * ``"stripped"``: the brain only, exact-zero background, under ``-T1`` (like BraTS);
    * ``"raw"``: the unstripped head (:func:`synthesize_head`) under ``-T1``, as downloaded;
    * ``"raw+brain"``: the head under ``-T1`` and the brain under ``-T1_brain``, as BET leaves
      them; the ``_brain`` file is byte-identical to the ``"stripped"`` mode's ``-T1`` file.

    Existing files are overwritten with identical content for identical arguments.
    """
    _check_seed(seed)
    downsample = _check_downsample(downsample)
    plan = plan_dataset(out_dir, n_hgg, n_lgg, n_healthy, contrasts, ixi=ixi)
    for planned in plan:
        parameters = draw_subject_parameters(seed, planned.index, planned.label)
        subject = synthesize_subject(parameters, planned.contrasts, downsample)
        for contrast, path in planned.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_nifti_atomic(subject.images[contrast], subject.affine, path)
        for contrast, path in planned.head_files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_nifti_atomic(synthesize_head(subject, contrast), subject.affine, path)
        logger.debug("wrote %s (%s)", planned.subject_id, planned.label)
    return pathlib.Path(out_dir)


def save_nifti_atomic(data: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
    """Writes a .nii.gz so that readers never see a truncated file.

    The temporary name is hidden and lacks the .nii.gz suffix so that globs never pick it up;
    gzip with mtime=0 makes files byte-identical across runs.
    """
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)  # scanner coordinates, as in the real files
    image.set_sform(affine, code=1)
    payload = gzip.compress(image.to_bytes(), compresslevel=_GZIP_LEVEL, mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_counts(n_hgg: int, n_lgg: int, n_healthy: int) -> None:
    for name, value in (("n_hgg", n_hgg), ("n_lgg", n_lgg), ("n_healthy", n_healthy)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if n_hgg + n_lgg + n_healthy == 0:
        raise ValueError("n_hgg, n_lgg and n_healthy are all zero: nothing to generate")
    if n_healthy > _MAX_IXI_SUBJECTS:
        raise ValueError(f"n_healthy must be <= {_MAX_IXI_SUBJECTS} (3-digit IXI ids), got {n_healthy}")
    if n_hgg + n_lgg > _MAX_BRATS_SUBJECTS:
        raise ValueError(f"n_hgg + n_lgg must be <= {_MAX_BRATS_SUBJECTS} (4-digit BraTS ids)")


def _check_ixi(ixi: str) -> None:
    if ixi not in IXI_MODES:
        raise ValueError(f"ixi must be one of {IXI_MODES}, got {ixi!r}")


def _check_contrasts(contrasts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(contrasts, str):
        contrasts = (contrasts,)
    contrasts = tuple(contrasts)
    if not contrasts:
        raise ValueError("contrasts must name at least one contrast")
    for contrast in contrasts:
        if contrast not in CONTRASTS:
            raise ValueError(f"contrasts: unknown contrast {contrast!r}, expected some of {CONTRASTS}")
    if len(set(contrasts)) != len(contrasts):
        raise ValueError(f"contrasts must not repeat a contrast, got {contrasts}")
    return contrasts


def _check_downsample(downsample: float) -> float:
    if isinstance(downsample, bool) or not isinstance(downsample, (int, float, np.number)):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    if not math.isfinite(downsample) or downsample <= 0:
        raise ValueError(f"downsample must be a positive finite number, got {downsample!r}")
    return float(downsample)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
