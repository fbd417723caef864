"""The scale images live in: uint8 on disk and in pictures, float in [-1, 1] in the models.

Every conversion between the two goes through these functions, so the data
loader, the evaluation and the sample grids cannot disagree on the scale.
"""

from __future__ import annotations

import numpy as np
import torch

from ddm.devices import to_device


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    """One uint8 image, HxW or HxWxC -> uint8 CxHxW, still 0..255 (what the training loader yields)."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # decoded arrays are read-only
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1).contiguous()


def to_model_space(image: np.ndarray) -> torch.Tensor:
    """One uint8 image, HxW or HxWxC -> float32 CxHxW in [-1, 1]."""
    return to_chw_uint8(image).float().div_(127.5).sub_(1.0)


def batch_to_model_space_on_device(x: torch.Tensor) -> torch.Tensor:
    """A training batch -> float32 in [-1, 1], computed where the batch is (the GPU, in training).

    uint8 batches are pixels (0..255) and are scaled; a floating-point batch
    (VAE latents, stored as float16) is in model space already and only becomes float32.
    """
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    if not x.is_floating_point():
        raise TypeError(f"a training batch must be uint8 pixels or floating point, got {x.dtype}")
    return x.float()


def batch_to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W], values still 0..255."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def model_space_on(x, device) -> torch.Tensor:
    """A batch of images -> float32 [N, C, H, W] in [-1, 1] on ``device``.

    uint8 pixels (a numpy array or tensor, [N, H, W] or [N, H, W, C]) cross as uint8, a quarter of float32's
    bytes, and are scaled where they land: the values and layout ``batch_to_model_space`` gives on the host. A
    float tensor [N, C, H, W] is in model space already.
    """
    if isinstance(x, np.ndarray) or x.dtype == torch.uint8:
        x = to_device(torch.as_tensor(np.ascontiguousarray(x, dtype=np.uint8)), device)
        return batch_to_model_space_on_device(x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2))
    return to_device(x, device).float()


def batch_to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1]."""
    return batch_to_nchw(images).div_(127.5).sub_(1.0)


def batch_to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, C, H, W] in [0, 1] (what pretrained encoders expect)."""
    return batch_to_nchw(images).div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model outputs in [-1, 1], [N, C, H, W] -> uint8 [N, H, W] (C = 1) or [N, H, W, C]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    x = x.transpose(0, 2, 3, 1)
    return x[..., 0] if x.shape[-1] == 1 else x
