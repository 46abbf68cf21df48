"""The input of a reconstruction network that reads k-space (``model: {name: varnet}``).

Such a network needs the undersampled k-space and its mask, not the zero-filled image. Both
travel through the site's data pipeline (batches, the pooled centralized site, evaluation)
as an ordinary float32 image tensor (N, :data:`KSPACE_CHANNELS`, H, W):

* channel :data:`ZERO_FILLED`: the zero-filled magnitude, exactly the input the image
  networks get (what the ``zero_filled`` arm scores and the report draws);
* channels :data:`REAL`, :data:`IMAG`: the masked centred k-space (lines not kept are 0);
* channel :data:`MASK`: the lines kept, 1 or 0 for each of the W columns, the same on
  every row (the phase-encoding axis is the last one, as data/kspace.py samples it);
* channel :data:`WINDOW`: 1 on the centred h x w region that the ground truth covers, 0
  elsewhere. fastMRI's k-space covers a larger field of view than its ground truth (its
  images are centre-cropped, MONAI ``CenterSpatialCrop``): the network reconstructs the
  whole field and crops its output to the window (:func:`center_crop`). All ones when the
  ground truth is the whole image (phantoms, pairs, MedMNIST).

H x W is the k-space's size; the ground truth (the split's labels) is (N, 1, h, w). A
1-channel input is the image networks' zero-filled image and is left as it is here.
"""

from __future__ import annotations

import torch
from torch import nn

from medfed.core.errors import DataError

ZERO_FILLED, REAL, IMAG, MASK, WINDOW = range(5)
KSPACE_CHANNELS = 5


def pack(zero_filled: torch.Tensor, masked: torch.Tensor, lines: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The packed input (N, 5, H, W) float32 of zero-filled magnitudes (N, H, W), masked
    k-space (N, H, W, 2) (real and imaginary parts last), the lines kept (N, W) and the
    ground truth's size ``(h, w)`` (at most H x W, centred)."""
    n, height, width = zero_filled.shape
    h, w = size
    if h > height or w > width:
        raise DataError(f"the ground truth ({h}x{w}) is larger than the k-space ({height}x{width})")
    out = torch.zeros(n, KSPACE_CHANNELS, height, width, dtype=torch.float32)
    out[:, ZERO_FILLED] = zero_filled
    out[:, REAL] = masked[..., 0]
    out[:, IMAG] = masked[..., 1]
    out[:, MASK] = lines.float()[:, None, :]
    top, left = height // 2 - h // 2, width // 2 - w // 2
    out[:, WINDOW, top:top + h, left:left + w] = 1
    return out


def is_packed(x: torch.Tensor) -> bool:
    """True for a packed k-space input (B, 5, H, W); False for a zero-filled image (B, 1, H, W)."""
    return x.ndim == 4 and x.shape[1] == KSPACE_CHANNELS


def window_size(x: torch.Tensor) -> tuple[int, int]:
    """The ground truth's size (h, w) of a packed batch (all its examples share one: they
    are stacked), read from the first example's window channel."""
    window = x[0, WINDOW] > 0.5
    return int(window.any(dim=1).sum()), int(window.any(dim=0).sum())


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centred ``size`` (h, w) region of (..., H, W), at MONAI ``CenterSpatialCrop``'s
    offsets (H // 2 - h // 2): the region fastMRI's ground truth covers."""
    height, width = x.shape[-2:]
    h, w = size
    top, left = height // 2 - h // 2, width // 2 - w // 2
    return x[..., top:top + h, left:left + w]


def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The masked k-space (B, 1, H, W, 2) (one coil), the lines kept (B, W) bool and the
    ground truth's size of a packed batch (B, 5, H, W). ValueError when ``x`` is not one."""
    if not is_packed(x):
        raise ValueError(f"a k-space network takes the packed input (B, {KSPACE_CHANNELS}, H, W) of "
                         f"data/kspace_input.py, got {tuple(x.shape)}")
    masked = torch.stack([x[:, REAL], x[:, IMAG]], dim=-1)[:, None]
    lines = x[:, MASK, 0] > 0.5
    return masked, lines, window_size(x)


def zero_filled_image(x: torch.Tensor) -> torch.Tensor:
    """The zero-filled magnitude (B, 1, h, w) an input stands for: a packed input's
    :data:`ZERO_FILLED` channel cropped to its window; a 1-channel input as it is."""
    if not is_packed(x):
        return x
    return center_crop(x[:, ZERO_FILLED:ZERO_FILLED + 1], window_size(x))


class ZeroFilledImage(nn.Module):
    """The ``zero_filled`` arm's "model": the undersampled input itself, scored with no
    network (:func:`zero_filled_image`; the identity for the image networks' input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zero_filled_image(x)
