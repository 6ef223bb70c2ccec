"""Preprocess every volume once with TorchIO and cache the result as one float16 array.

The cache key is made of the input files' identity (path, size, modification time) and the
preprocessing parameters, so every trial and every rerun reads the same entry and a changed
file or parameter makes a new one. An entry is built in a temporary folder and renamed into
place only when complete, so a crash never leaves a half-written entry that is later trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torchio as tio

from datasets.atomic import write_text_atomic
from datasets.records import SubjectRecord
from datasets.registration import REGISTRATION_CHOICES

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: subjects.csv carries source and site


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters that change the cached arrays (and so the cache key)."""

    spacing: float = 2.0
    percentiles: tuple[float, float] = (0.5, 99.5)
    target_shape: tuple[int, int, int] | None = None  # None: the largest brain bounding box in the data
    register: str = "none"  # "mni": inputs were N4-corrected and affinely registered first (datasets.registration)

    def __post_init__(self) -> None:
        if self.register not in REGISTRATION_CHOICES:
            raise ValueError(f"--register must be one of {', '.join(REGISTRATION_CHOICES)}, got {self.register!r}")
        if not self.spacing > 0:
            raise ValueError(f"spacing must be positive (mm), got {self.spacing}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if self.target_shape is not None and (len(self.target_shape) != 3 or min(self.target_shape) < 1):
            raise ValueError(f"target_shape must be three positive integers, got {self.target_shape}")


@dataclass(frozen=True)
class CachedDataset:
    """A finished cache entry: ``volumes.npy`` (N, C, X, Y, Z) float16 in RAS order, and its subject table
    (``index, subject_id, label, group, source, site``)."""

    directory: Path

    @property
    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.directory / "subjects.csv", dtype=str, keep_default_na=False).astype({"index": int})

    @property
    def meta(self) -> dict:
        return json.loads((self.directory / "meta.json").read_text())

    def volumes(self) -> np.ndarray:
        """Memory-mapped, read-only: trials share the page cache instead of copies."""
        return np.load(self.directory / "volumes.npy", mmap_mode="r")


def cache_key(records: Sequence[SubjectRecord], config: PreprocessConfig) -> str:
    identity = []
    for record in sorted(records, key=lambda r: r.subject_id):
        files = []
        for path in record.paths:
            stat = os.stat(path)
            files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
        identity.append([record.subject_id, record.label, record.group, files])
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, "config": asdict(config), "files": identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _foreground(tensor: torch.Tensor) -> torch.Tensor:
    # Inputs are skull-stripped: the brain is whatever is not background zero.
    return tensor > 0


def _resample_and_crop(paths: tuple[str, ...], config: PreprocessConfig) -> np.ndarray:
    """Canonical orientation, resampling, percentile rescaling, crop to the brain's bounding box."""
    images = {}
    for channel, path in enumerate(paths):
        nifti = nib.load(path)
        data = np.asanyarray(nifti.dataobj, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., 0]
        images[f"channel{channel}"] = tio.ScalarImage(tensor=torch.from_numpy(data[None].copy()), affine=nifti.affine)
    subject = tio.Subject(images)
    steps: list[tio.Transform] = [tio.ToCanonical(), tio.Resample(config.spacing)]
    if len(paths) > 1:
        steps.append(tio.Resample("channel0"))  # every contrast on the first one's grid
    subject = tio.Compose(steps)(subject)
    brain = torch.zeros_like(subject["channel0"].data, dtype=torch.uint8)
    for name in images:
        brain |= _foreground(subject[name].data).to(torch.uint8)
    subject.add_image(tio.LabelMap(tensor=brain, affine=subject["channel0"].affine), "brain")
    subject = tio.Compose(
        [
            tio.RescaleIntensity(out_min_max=(0, 1), percentiles=config.percentiles, masking_method=_foreground),
            tio.CropOrPad(target_shape=None, mask_name="brain"),
        ]
    )(subject)
    return np.concatenate([subject[name].data.numpy() for name in images]).astype(np.float16)


def _centre_to_shape(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    image = tio.ScalarImage(tensor=torch.from_numpy(volume.astype(np.float32)))
    return tio.CropOrPad(shape)(image).data.numpy().astype(np.float16)


def _entry_ready(directory: Path) -> bool:
    return (directory / "meta.json").is_file() and (directory / "volumes.npy").is_file()


def preprocess(
    records: Sequence[SubjectRecord],
    config: PreprocessConfig,
    cache_root: str | os.PathLike,
    num_workers: int | None = None,
) -> CachedDataset:
    """Return the cache entry for ``records`` under ``config``, building it if it does not exist."""
    if not records:
        raise ValueError("No subjects to preprocess")
    cache_root = Path(cache_root)
    key = cache_key(records, config)
    final = cache_root / key
    if _entry_ready(final):
        log.info("Preprocessed cache hit: %s", final)
        return CachedDataset(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r.subject_id)
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    log.info("Preprocessing %d subjects into %s with %d worker(s)", len(records), final, workers)
    paths = [r.paths for r in records]
    if workers > 1:
        # spawn: forking a process that already holds torch/Ray threads is not safe.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            cropped = list(pool.map(_resample_and_crop, paths, [config] * len(paths), chunksize=4))
    else:
        cropped = [_resample_and_crop(p, config) for p in paths]
    shape = config.target_shape or tuple(int(max(v.shape[axis + 1] for v in cropped)) for axis in range(3))

    partial = cache_root / f"{key}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        volumes = np.lib.format.open_memmap(partial / "volumes.npy", mode="w+", dtype=np.float16,
                                            shape=(len(records), cropped[0].shape[0], *shape))
        for index, volume in enumerate(cropped):
            volumes[index] = _centre_to_shape(volume, shape)
        volumes.flush()
        del volumes
        table = pd.DataFrame(
            {"index": range(len(records)), "subject_id": [r.subject_id for r in records],
             "label": [r.label for r in records], "group": [r.group for r in records],
             "source": [r.source for r in records], "site": [r.site for r in records]}
        )
        table.to_csv(partial / "subjects.csv", index=False)
        meta = {"key": key, "config": asdict(config), "shape": list(shape), "channels": int(cropped[0].shape[0]),
                "n_subjects": len(records), "spacing_mm": config.spacing, "axes": "N,C,X,Y,Z (RAS)",
                "dtype": "float16", "version": CACHE_FORMAT_VERSION}
        # meta.json last: its presence marks a complete entry even before the rename.
        write_text_atomic(partial / "meta.json", json.dumps(meta, indent=2))
        try:
            os.replace(partial, final)
        except OSError:
            if not _entry_ready(final):  # another process finished the same entry first: theirs is as good
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CachedDataset(final)
