"""The canvas every dataset is brought to (gray28, rgb32): conversion onto it, and per-channel statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transferlab.errors import UserError, suggest


@dataclass(frozen=True)
class Canvas:
    """The image shape every dataset is brought to: channels x size x size."""

    name: str
    channels: int
    size: int


CANVASES = {"gray28": Canvas("gray28", 1, 28), "rgb32": Canvas("rgb32", 3, 32)}
DEFAULT_CANVAS = "gray28"


def get_canvas(name) -> Canvas:
    """The canvas called ``name`` (a Canvas passes through); unknown names are a UserError."""
    if isinstance(name, Canvas):
        return name
    if name not in CANVASES:
        raise UserError(f"unknown canvas '{name}'{suggest(str(name), CANVASES)}; known canvases: {', '.join(CANVASES)}")
    return CANVASES[name]


# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (PIL's "L" mode uses them too).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Images converted per step, so that 120k images never become one huge float tensor.
_CHUNK = 4096


def to_canvas(images: torch.Tensor, canvas) -> tuple[torch.Tensor, list[str]]:
    """Bring uint8 images ``[N, C, H, W]`` (C = 1 or 3) onto ``canvas``.

    Returns the converted uint8 images and the list of transforms applied (empty when
    the images already fit). Gray -> RGB replicates the channel; RGB -> gray uses the
    ITU-R 601 luma weights; resizing is bilinear with antialiasing. The whole chain runs
    in float and rounds to uint8 once at the end.
    """
    canvas = get_canvas(canvas)
    n, channels, height, width = images.shape
    if channels not in (1, 3):
        raise UserError(f"images have {channels} channels; only 1 (gray) or 3 (RGB) can be put on a canvas")

    transforms = []
    if channels == 3 and canvas.channels == 1:
        transforms.append("grayscale (ITU-R 601 luma weights)")
    needs_resize = (height, width) != (canvas.size, canvas.size)
    if needs_resize:
        source_size = f"{height}" if height == width else f"{height}x{width}"
        transforms.append(f"antialiased bilinear resize {source_size}->{canvas.size}")
    if channels == 1 and canvas.channels == 3:
        transforms.append("gray replicated to 3 channels")
    if not transforms:
        return images.contiguous(), []

    # Resize on the smaller number of channels: gray before resizing when reducing, and
    # replicate only after resizing when expanding (the result is the same, the work less).
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((n, canvas.channels, canvas.size, canvas.size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float32)
        if channels == 3 and canvas.channels == 1:
            chunk = (chunk * luma).sum(dim=1, keepdim=True)
        if needs_resize:
            chunk = torch.nn.functional.interpolate(
                chunk, size=(canvas.size, canvas.size), mode="bilinear", antialias=True, align_corners=False
            )
        chunk = chunk.round_().clamp_(0, 255).to(torch.uint8)
        if chunk.shape[1] == 1 and canvas.channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        out[start : start + _CHUNK] = chunk
    return out, transforms


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images on the [0, 1] scale.

    uint8 images are divided by 255; float images are taken as already in [0, 1]. Sums
    run in float64 over chunks, so 120k images never become one float64 copy.
    """
    if images.ndim != 4:
        raise UserError(f"channel_stats needs [N, C, H, W] images, got shape {list(images.shape)}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].to(torch.float64) / scale
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += (chunk * chunk).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise UserError("channel_stats needs at least one image")
    mean = total / count
    variance = (total_squares / count - mean * mean).clamp_min(0.0)
    return mean.tolist(), variance.sqrt().tolist()
