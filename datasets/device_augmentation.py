"""The ``light`` augmentation, batched on the batch's own device (GPU in training, CPU in tests).

Why: TorchIO augments one sample at a time on the CPU (SimpleITK resampling, 15-50 ms per 2 mm
volume), which cannot keep a GPU busy once the trainer keeps a fold's cached volumes on the device
and draws batches there. Here a whole batch gets per-sample random parameters and is resampled by
one ``affine_grid`` + one ``grid_sample`` call, on whatever device the batch lives on.

Layout: batches are RAS, ``(B, C, X, Y, Z)`` with X = left -> right, exactly as cached. Augment
first, then permute to the network's video layout ``(B, C, Z, Y, X)`` (see
``datasets/volume_dataset.py::to_video_layout``), so "left-right" is always axis 2 here.

Parameters at strength ``s`` (the same formulas as ``datasets/augmentation.py::_light``):

- scales: one per axis (TorchIO's ``RandomAffine`` default, ``isotropic=False``), each uniform in
  ``(max(0.5, 1 - 0.1 s), min(2.0, 1 + 0.2 s))``; a scale > 1 makes the anatomy look larger;
- angles: one per axis (X, Y, Z) in degrees, uniform in ``(-d, d)`` with ``d = min(45, 10 s)``;
  a positive angle turns the content counter-clockwise about that +axis (right-hand rule in RAS),
  so +90 degrees about Z takes a blob on the right (+X) to the front (+Y);
- flip: left-right (X) with probability ``min(0.5, 0.25 s)``, applied after the affine.

How it matches TorchIO (``tio.RandomAffine(scales, degrees)`` then ``tio.RandomFlip(("LR",))``):
rotation and scaling are about the volume centre (voxel ``(n - 1) / 2``, TorchIO's
``center="image"``); the content is rotated then scaled (SimpleITK's composite of
``ScaleTransform`` and ``Euler3DTransform``), the Euler matrix is ``Rz @ Rx @ Ry`` (ITK's default
order, which TorchIO's LPS sign flips carry over to RAS unchanged); interpolation is linear and the
fill value is 0 (TorchIO pads with the volume minimum, which is 0 for our background). The flip is
folded into the sampling matrix (a -1 on X), so it costs nothing extra and is exact: with no
rotation or scaling the sampling points land on voxel centres. ``tests/datasets/
test_device_augmentation.py`` checks all this against TorchIO's deterministic ``tio.Affine``.

Where it differs: voxels are assumed isotropic (the cache is; rotations are done in voxel units);
near the border, ``grid_sample`` with zero padding blends the last voxel with the 0 fill, whereas
SimpleITK's linear interpolator still reads a point up to half a voxel outside the grid from the edge
voxel; and the random numbers come from a ``torch.Generator``, not TorchIO's global torch RNG.

Dtype: the grid and the sampling are computed in float32 (float64 for float64 input) and the result
is cast back to the input dtype. A half-precision grid would quantise coordinates by a few
hundredths of a voxel on a 90-voxel axis; the float32 copy of the batch costs a few MB next to the grid
(3 floats per voxel), which ``affine_grid`` materialises anyway.

Why not Kornia: ``kornia.geometry.transform.warp_affine3d`` is itself a normalised matrix +
``F.affine_grid`` + ``F.grid_sample`` and ``RandomAffine3D`` wraps it, so neither can do less work;
``RandomAffine3D`` also draws from the global RNG with its own parameter conventions. Measured with
kornia 0.9.0 on this project's 2-core CPU (shared, so noisy; one torch thread; batch 4 of
1x72x90x77 float32, min-median ms): this module 53-55 (draw + apply 54-64), ``warp_affine3d`` with
the same matrices 53-59, ``RandomAffine3D`` 54-60; TorchIO's per-sample path on the same four
volumes 62-98. Equal speed does not pay for a dependency, so there is none. On CPU the batched path
is only modestly faster than TorchIO; the point is that it runs on the GPU, next to the batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datasets.augmentation import MAX_STRENGTH


@dataclass(frozen=True)
class LightParams:
    """Per-sample parameters of one batch: ``scales`` (B, 3) and ``degrees`` (B, 3) per RAS axis
    (X, Y, Z), ``flip`` (B,) bool for a left-right flip."""

    scales: torch.Tensor
    degrees: torch.Tensor
    flip: torch.Tensor

    def __post_init__(self) -> None:
        batch = self.flip.shape[0] if self.flip.dim() == 1 else -1
        if batch < 0 or self.scales.shape != (batch, 3) or self.degrees.shape != (batch, 3):
            raise ValueError(
                "LightParams needs scales (B, 3), degrees (B, 3) and flip (B,), got "
                f"{tuple(self.scales.shape)}, {tuple(self.degrees.shape)}, {tuple(self.flip.shape)}"
            )
        if self.flip.dtype != torch.bool:
            raise ValueError(f"LightParams.flip must be a bool tensor, got {self.flip.dtype}")

    def __len__(self) -> int:
        return self.flip.shape[0]


@dataclass(frozen=True)
class LightRanges:
    """The ranges the parameters are drawn from at one strength."""

    scale_low: float
    scale_high: float
    max_degrees: float
    flip_probability: float


def light_ranges(strength: float) -> LightRanges:
    """Ranges at ``strength``: the formulas of ``datasets/augmentation.py::_light``."""
    _check_strength(strength)
    return LightRanges(
        scale_low=max(0.5, 1 - 0.1 * strength),
        scale_high=min(2.0, 1 + 0.2 * strength),
        max_degrees=min(45.0, 10.0 * strength),
        flip_probability=min(0.5, 0.25 * strength),
    )


def draw_light_params(
    batch_size: int, strength: float, generator: torch.Generator, device: torch.device | str | None = None
) -> LightParams:
    """Draw one batch's parameters with ``generator``, in one place, so a seed fixes the batch.

    The numbers are drawn on the generator's device and then moved to ``device``: a CPU generator
    therefore gives the same augmentation whether the batch lives on the CPU or the GPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ranges = light_ranges(strength)
    u = torch.rand(batch_size, 7, generator=generator, device=generator.device, dtype=torch.float64)
    scales = ranges.scale_low + (ranges.scale_high - ranges.scale_low) * u[:, 0:3]
    degrees = ranges.max_degrees * (2 * u[:, 3:6] - 1)
    flip = u[:, 6] < ranges.flip_probability
    device = generator.device if device is None else device
    return LightParams(scales.float().to(device), degrees.float().to(device), flip.to(device))


def apply_light(batch: torch.Tensor, params: LightParams) -> torch.Tensor:
    """Resample the RAS batch ``(B, C, X, Y, Z)`` with ``params``: one grid, one sampling call.

    Deterministic given ``params``; linear interpolation, 0 outside the volume; the output has the
    input's shape, dtype and device.
    """
    _check_batch(batch, params)
    compute_dtype = torch.float64 if batch.dtype == torch.float64 else torch.float32
    theta = _grid_theta(params, batch.shape[2:], compute_dtype, batch.device)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=True)
    out = F.grid_sample(batch.to(compute_dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(batch.dtype)


def augment_light(batch: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Draw per-sample parameters and apply them; at strength 0 the input itself comes back."""
    _check_strength(strength)
    if strength == 0:
        return batch
    return apply_light(batch, draw_light_params(batch.shape[0], strength, generator, batch.device))


def rotation_matrices(degrees: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles about RAS X, Y, Z -> (B, 3, 3) ``Rz @ Rx @ Ry`` (ITK's Euler3D order)."""
    x, y, z = torch.deg2rad(degrees).unbind(-1)
    return _about(z, 0, 1) @ _about(x, 1, 2) @ _about(y, 2, 0)


def _about(angle: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Counter-clockwise rotation by ``angle`` in the (i, j) plane, i.e. about the third axis."""
    matrix = torch.eye(3, dtype=angle.dtype, device=angle.device).repeat(angle.shape[0], 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    matrix[:, i, i], matrix[:, i, j], matrix[:, j, i], matrix[:, j, j] = cos, -sin, sin, cos
    return matrix


def _grid_theta(params: LightParams, spatial: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``affine_grid``'s (B, 3, 4) matrix mapping output to input points in normalised coordinates.

    In voxel units about the centre, content moves as ``x -> flip(S @ R @ x)``, so an output voxel
    reads the input at ``R^T @ S^-1 @ Flip @ y``. ``align_corners=True`` makes normalised -1/+1 the
    first/last voxel centres, so ``D = diag((n - 1) / 2)`` converts; ``affine_grid`` orders its
    coordinates (W, H, D) = (Z, Y, X), hence the reversal of rows and columns.
    """
    scales = params.scales.to(device, dtype)
    flip = torch.where(params.flip.to(device), -1.0, 1.0).to(dtype)
    sampling = rotation_matrices(params.degrees.to(device, dtype)).transpose(1, 2) / scales[:, None, :]
    sampling = sampling * torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], dim=1)[:, None, :]
    normalised = sampling * _extent_ratios(tuple(spatial), dtype, device)
    reordered = normalised.flip(1, 2)
    theta = torch.cat([reordered, torch.zeros_like(reordered[:, :, :1])], dim=2)
    # affine_grid multiplies its base grid by theta^T: stored transposed, that product reads contiguous
    # memory, and the (bit-identical) grid comes ~35% faster on CPU (13 vs 21 ms at 4 x 72x90x77).
    return theta.mT.contiguous().mT


@functools.lru_cache(maxsize=32)
def _extent_ratios(spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 3, 3) ``half[j] / half[i]`` with ``half = (n - 1) / 2``: voxel -> normalised units, per batch shape.

    Cached because building a tensor from Python numbers on a GPU is a blocking host-to-device copy: once per
    shape, not once per training step.
    """
    half = [(n - 1) / 2 for n in spatial]
    return torch.tensor([[[h_j / h_i for h_j in half] for h_i in half]], dtype=dtype, device=device)


def _check_strength(strength: float) -> None:
    """Same rule and message as ``build_augmentation``, so callers see one error for one option."""
    if not isinstance(strength, (int, float)) or not 0 <= strength <= MAX_STRENGTH:  # NaN fails too
        raise ValueError(f"aug_strength must be in [0, {MAX_STRENGTH}], got {strength}")


def _check_batch(batch: torch.Tensor, params: LightParams) -> None:
    """A RAS batch (B, C, X, Y, Z) of floats, every spatial axis >= 2 voxels, one sample per params row."""
    if batch.dim() != 5:
        raise ValueError(f"batch must be (B, C, X, Y, Z), got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"batch must be floating point, got {batch.dtype}")
    if min(batch.shape[2:]) < 2:
        raise ValueError(f"every spatial axis needs >= 2 voxels, got {tuple(batch.shape[2:])}")
    if batch.shape[0] != len(params):
        raise ValueError(f"batch has {batch.shape[0]} samples but params has {len(params)}")
