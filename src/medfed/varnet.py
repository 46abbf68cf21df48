"""VarNet for the reconstruction task (``model: {name: varnet}``): MONAI's end-to-end
variational network (``monai.apps.reconstruction.networks.nets.varnet.VariationalNetworkModel``,
Sriram et al. 2020) behind medfed's input and output.

MONAI's network reads the undersampled k-space (B, C, H, W, 2) (C coils; here one) and
its mask, estimates coil sensitivities from the fully sampled centre of k-space
(``CoilSensitivityModel``), then runs ``cascades`` blocks, each pulling the k-space towards
the measured lines (data consistency, a learned weight) and refining it in image space (a
``ComplexUnet``); it returns the magnitude image. :class:`VarNetReconstructor` takes the
packed input of data/kspace_input.py (B, 5, H, W), unpacks it, runs MONAI's network and
returns the magnitude (B, 1, h, w) cropped to the ground truth's window: on the scale of the
ground truth, since the k-space was made from (or scaled with) it by orthonormal FFTs.

MONAI's network takes one mask for the whole batch, while medfed draws one per example:
its data-consistency step broadcasts a mask (B, 1, 1, W, 1) as it is, and only its coil
sensitivity model reads the mask line by line, so that one is adapted
(:class:`PerExampleCoilSensitivityModel`): each example's fully sampled centre is found in
its own mask. Every value is then what the example would get alone (the normalisations are
per example: instance norm, ``ComplexUnet``'s per-example scaling). Every parameter
and buffer is float32, as the codec needs. MONAI is imported with this module: models.py
imports it only to build a varnet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.apps.reconstruction.networks.nets.coil_sensitivity_model import CoilSensitivityModel
from monai.apps.reconstruction.mri_utils import root_sum_of_squares_t
from monai.apps.reconstruction.networks.nets.complex_unet import ComplexUnet
from monai.apps.reconstruction.networks.nets.utils import (
    reshape_batch_channel_to_channel_dim,
    reshape_channel_to_batch_dim,
)
from monai.apps.reconstruction.networks.nets.varnet import VariationalNetworkModel
from monai.networks.blocks.fft_utils_t import ifftn_centered_t
from torch import nn

from medfed.data.kspace_input import center_crop, unpack

VARNET_CASCADES = 4  # model.cascades when unset (MONAI's default is 12: costly on CPU)


def varnet_features(width: int) -> tuple[int, ...]:
    """The refinement ComplexUnet's six feature counts for ``model.width`` w:
    (w, w, 2w, 4w, 8w, w), the shape of MONAI's default (32, 32, 64, 128, 256, 32)."""
    w = width
    return (w, w, 2 * w, 4 * w, 8 * w, w)


class PerExampleCoilSensitivityModel(CoilSensitivityModel):
    """MONAI's ``CoilSensitivityModel`` (2D) for a batch whose examples each have their own
    mask (B, 1, 1, W, 1): MONAI's takes one mask for the batch (its search for the fully
    sampled centre of k-space reads one line at a time). Here each example's centre band is
    found in its own mask, by MONAI's search bounded by the edges of k-space (MONAI's walks
    past them, an IndexError, when every line is kept: ``acceleration: 1``, ``random``);
    the rest is MONAI's forward: the band's image by inverse FFT, MONAI's ComplexUnet, the
    maps divided by their root sum of squares over the coils."""

    def get_fully_sampled_region(self, mask: torch.Tensor) -> tuple[int, int]:
        width = mask.shape[-2]
        left = right = width // 2
        while right < width and mask[..., right, :]:
            right += 1
        while left >= 0 and mask[..., left, :]:
            left -= 1
        return left + 1, right

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        band = torch.zeros(mask.shape, dtype=masked_kspace.dtype, device=masked_kspace.device)
        for i in range(mask.shape[0]):
            left, right = self.get_fully_sampled_region(mask[i:i + 1])
            start = (mask.shape[-2] - (right - left) + 1) // 2  # MONAI's start of the centre band
            band[i, ..., start:start + right - left, :] = 1
        x = ifftn_centered_t(masked_kspace * band, spatial_dims=self.spatial_dims, is_complex=True)
        x, b = reshape_channel_to_batch_dim(x)  # (B * C, 1, H, W, 2)
        x = reshape_batch_channel_to_channel_dim(self.conv_net(x), b)  # (B, C, H, W, 2)
        return x / root_sum_of_squares_t(x, spatial_dim=self.coil_dim).unsqueeze(self.coil_dim)


class VarNetReconstructor(nn.Module):
    """MONAI's ``VariationalNetworkModel`` (single coil, 2D) on the packed k-space input of
    data/kspace_input.py: ``forward`` takes (B, 5, H, W) and returns the magnitude image
    (B, 1, h, w), h x w the ground truth's window. ``cascades`` blocks, each refining with a
    ``ComplexUnet`` of ``features``; the coil sensitivities from one of ``sens_features``.
    The state-dict keys are MONAI's under ``varnet.``, less each block's constant ``zeros``
    (the value data consistency puts on lines not measured), which stays out of the state
    the sites share: DP noise, compression or a robust rule would otherwise change it."""

    def __init__(self, cascades: int, features: Sequence[int], sens_features: Sequence[int]):
        super().__init__()
        self.varnet = VariationalNetworkModel(
            coil_sensitivity_model=PerExampleCoilSensitivityModel(spatial_dims=2, features=tuple(sens_features)),
            refinement_model=ComplexUnet(spatial_dims=2, features=tuple(features)),
            num_cascades=cascades,
            spatial_dims=2,
        )
        for block in self.varnet.cascades:  # a constant, not state: kept out of the state dict the sites share
            block.register_buffer("zeros", block.zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, lines, size = unpack(x)  # (B, 1, H, W, 2), (B, W) bool, (h, w)
        # float32 even under the site's autocast (CUDA): half-precision FFTs take power-of-two
        # sizes only (fastMRI's 640x368 is not one), and k-space values span orders of magnitude
        with torch.autocast(device_type=x.device.type, enabled=False):
            image = self.varnet(masked.float(), lines[:, None, None, :, None])  # each example's own mask (B, 1, 1, W, 1)
        return center_crop(image[:, None], size)  # (B, H, W) -> (B, 1, h, w)


def build_varnet(cascades: int | None, features: Sequence[int] | None, sens_features: Sequence[int] | None,
                 width: int) -> VarNetReconstructor:
    """The network of ``model: {name: varnet}``, its unset fields at their defaults
    (:data:`VARNET_CASCADES`, :func:`varnet_features` of ``width``, ``features``)."""
    feats = tuple(features) if features is not None else varnet_features(width)
    return VarNetReconstructor(
        cascades if cascades is not None else VARNET_CASCADES,
        feats,
        tuple(sens_features) if sens_features is not None else feats,
    )
