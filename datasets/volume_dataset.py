"""A torch Dataset over the cached volumes, shaped for video ResNets."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset


def to_video_layout(volume: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) in RAS -> (C, Z, Y, X): axial slices become the video's frames."""
    return volume.permute(0, 3, 2, 1).contiguous()


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
