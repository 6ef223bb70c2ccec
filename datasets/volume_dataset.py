"""The cached volumes shaped for video ResNets: a torch Dataset (host, per sample) and a fold part on a device.

Two ways to feed a trial (``trainables/fold_training.py`` chooses by the augmentation kind):

- ``DeviceVolumes``: one part of a fold (train, val or test) copied once to the trial's device as a
  single float16 tensor; batches are drawn there by index and cast to float32 on the device. No
  DataLoader, no per-sample host work. Used for evaluation always and for training with ``none`` and
  ``light`` augmentation (``light`` runs on the device: ``datasets/device_augmentation.py``).
- ``VolumeDataset``: per-sample items read from the memory-mapped cache, with an optional TorchIO
  ``transform``; the ``heavy`` augmentation's path (a DataLoader with ``num_workers`` workers).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

LAYOUTS = ("video", "ras")


def to_video_layout(volume: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) in RAS -> (C, Z, Y, X): axial slices become the video's frames."""
    return volume.permute(0, 3, 2, 1).contiguous()


def batch_to_video_layout(batch: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) in RAS -> (B, C, Z, Y, X): ``to_video_layout`` for a batch."""
    return batch.permute(0, 1, 4, 3, 2).contiguous()


class VolumeDataset(Dataset):
    """Items are ``(volume, class_index)``; ``transform`` (TorchIO) is applied in RAS space first."""

    def __init__(
        self,
        volumes: np.ndarray,
        indices: Sequence[int],
        targets: Sequence[int],
        spacing: float,
        transform: tio.Transform | None = None,
    ) -> None:
        if len(indices) != len(targets):
            raise ValueError(f"indices ({len(indices)}) and targets ({len(targets)}) differ in length")
        self.volumes, self.indices, self.targets = volumes, list(indices), list(targets)
        self.affine = np.diag([spacing, spacing, spacing, 1.0])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        volume = torch.from_numpy(np.asarray(self.volumes[self.indices[item]], dtype=np.float32))
        if self.transform is not None:
            volume = self.transform(tio.ScalarImage(tensor=volume, affine=self.affine)).data
        return to_video_layout(volume), self.targets[item]


class DeviceVolumes:
    """One part of a fold on ``device``: ``volumes`` (N, C, ...) in the cache's dtype (float16), ``targets`` (N,).

    ``layout="video"`` stores (N, C, Z, Y, X), ready for the network; ``layout="ras"`` keeps the cache's
    (N, C, X, Y, Z) so a batch can be augmented in RAS first (``batch(..., augment=...)`` permutes after).
    The copy is made in chunks of ``chunk`` volumes, so neither host nor device holds a second full copy.
    """

    def __init__(self, volumes: np.ndarray, indices: Sequence[int], targets: Sequence[int],
                 device: torch.device | str, layout: str = "video", chunk: int = 32) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if len(indices) != len(targets):
            raise ValueError(f"indices ({len(indices)}) and targets ({len(targets)}) differ in length")
        indices = np.asarray(indices, dtype=np.int64)
        channels, x, y, z = volumes.shape[1:]
        shape = (len(indices), channels, z, y, x) if layout == "video" else (len(indices), channels, x, y, z)
        dtype = torch.from_numpy(np.empty(0, dtype=volumes.dtype)).dtype
        self.device, self.layout = torch.device(device), layout
        self.volumes = torch.empty(shape, dtype=dtype, device=self.device)
        for start in range(0, len(indices), chunk):
            rows = indices[start:start + chunk]
            part = torch.from_numpy(np.ascontiguousarray(volumes[rows])).to(self.device)
            self.volumes[start:start + len(rows)] = part.permute(0, 1, 4, 3, 2) if layout == "video" else part
        self.targets_host = np.asarray(targets, dtype=np.int64)
        self.targets = torch.as_tensor(self.targets_host, device=self.device)

    def __len__(self) -> int:
        return self.volumes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.volumes.element_size() * self.volumes.nelement() + self.targets.element_size() * len(self)

    def batch(self, rows: torch.Tensor | slice, augment=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 volumes in video layout (B, C, Z, Y, X) and class indices, both on the device.

        ``rows``: a slice (evaluation order) or an index tensor on the device (a shuffled order); no
        host synchronisation either way. ``augment`` (RAS layout only) maps a float32 RAS batch to one.
        """
        if isinstance(rows, slice):
            volumes, targets = self.volumes[rows], self.targets[rows]
        else:
            volumes, targets = self.volumes.index_select(0, rows), self.targets.index_select(0, rows)
        volumes = volumes.float()
        if self.layout == "video":
            if augment is not None:
                raise ValueError("augmentation runs in RAS: build the part with layout='ras'")
            return volumes, targets
        if augment is not None:
            volumes = augment(volumes)
        return batch_to_video_layout(volumes), targets
