"""Batched, vectorised image transforms: every one draws its random parameters per sample and applies them to
the whole batch at once.

Every transform takes a float batch ``(B, C, H, W)`` in ``[0, 1]`` and a random source, draws its random
parameters **per sample**, and applies them to the whole batch at once — no Python loop over samples, no PIL. So
augmentation runs on the training device and costs far less than the forward pass. The random source is either a
``torch.Generator`` or per-sample streams (:class:`PerSampleRandom`, the trainer's ``KeyedRandom``); the same
source state gives the same output.

Each random transform is split in two (:class:`sslbench.data.draws.DrawnTransform`): ``draw`` makes its random
numbers on the host — including the crop boxes' rejection sampling — and ``apply_draws`` consumes them on the
device with tensor ops only, never reading a value back. ``t(x, rng)`` does both; a view pipeline draws for all
its transforms and views first and moves the whole step's draws to the device in one copy
(:func:`sslbench.data.draws.to_device`). The photometric transforms live in :mod:`sslbench.data.photometric`
and are re-exported here.

Semantics follow torchvision's transforms (crop-then-resize random-resized-crop, blend-based colour jitter with
torchvision's grey weights, reflect-padded Gaussian blur); deviations are noted where they occur. The view
pipelines that objectives declare are built from these in :mod:`sslbench.data.views`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.data.draws import (  # noqa: F401 (PerSampleRandom, to_device: re-exported)
    DrawnTransform, PerSampleRandom, Random, Shape, host_rand, plannable, to_device)
from sslbench.data.photometric import (  # noqa: F401 (re-exported: the transforms are imported from here)
    ColorJitter, GaussianBlur, Grayscale, Solarize, blur, chosen, gaussian_kernels, hsv_to_rgb, per_sample,
    rgb_to_hsv)


Transform = Callable[[Tensor, Random], Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.5,)


def to_float(images: Tensor) -> Tensor:
    """``uint8`` images → float in ``[0, 1]``; float input is returned unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def normalization_stats(channels: int, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std: the given ones, else ImageNet's for 3 channels and ``(0.5,)/(0.5,)`` for 1."""
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN * channels,
                                                                                     GREY_STD * channels)
    mean, std = tuple(mean or default_mean), tuple(std or default_std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalisation mean {mean} / std {std} do not match {channels} channels")
    return mean, std


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------------------------- geometry

def _centres(n: int, like: Tensor) -> Tensor:
    """Centres of ``n`` pixels in grid_sample's [-1, 1] coordinates, shape ``(1, n)``."""
    return ((2 * torch.arange(n, device=like.device, dtype=like.dtype) + 1) / n - 1).unsqueeze(0)


def crop_resize(images: Tensor, boxes: Tensor, size: int | Sequence[int], interpolation: str = "bilinear") -> Tensor:
    """Crop each image to its box ``(top, left, height, width)`` (pixels) and resize it to ``size``, in one call.

    One affine sampling grid per sample (built separably, then ``F.grid_sample``, ``align_corners=False``).
    Bilinear: sampling positions are clamped to the box's outer pixel centres, which reproduces
    *crop-then-resize* (torchvision's semantics) exactly. Bicubic: taps that reach past an interior box's edge
    read the image's real neighbouring pixels (replicated at the image border), so only the outermost two
    output pixels differ from crop-then-resize, and a full-image box equals ``F.interpolate`` exactly.
    No antialiasing: fine when upsampling (our small images); large downscales (500 px → 96 px) alias a little.
    """
    b, _, h_in, w_in = images.shape
    out_h, out_w = _pair(size)
    top, left, h, w = boxes.to(images.device, images.dtype).unbind(1)
    # Axis-aligned boxes make the affine grid separable: x depends on the column only, y on the row only.
    # Output pixel centres in [-1, 1] (align_corners=False), mapped into each box in the input's [-1, 1] frame.
    gx = _centres(out_w, images) * (w / w_in).unsqueeze(1) + ((2 * left + w) / w_in - 1).unsqueeze(1)
    gy = _centres(out_h, images) * (h / h_in).unsqueeze(1) + ((2 * top + h) / h_in - 1).unsqueeze(1)
    if interpolation == "bilinear":
        # Clamp to the box's first and last pixel centres, so nothing outside the box is read.
        gx = torch.maximum(torch.minimum(gx, ((2 * (left + w) - 1) / w_in - 1).unsqueeze(1)),
                           ((2 * left + 1) / w_in - 1).unsqueeze(1))
        gy = torch.maximum(torch.minimum(gy, ((2 * (top + h) - 1) / h_in - 1).unsqueeze(1)),
                           ((2 * top + 1) / h_in - 1).unsqueeze(1))
    grid = torch.stack([gx.unsqueeze(1).expand(b, out_h, out_w), gy.unsqueeze(2).expand(b, out_h, out_w)], dim=-1)
    out = F.grid_sample(images, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out  # bicubic overshoots


class RandomResizedCrop(DrawnTransform):
    """Random box of ``scale`` × image area and aspect ratio in ``ratio``, resized to ``size`` (Szegedy et al. 2015).

    Boxes follow torchvision's rule, vectorised: 10 tries of (uniform area fraction, log-uniform aspect ratio),
    integer sides by rounding, uniform integer position; the first try that fits wins, else the central crop
    with the ratio clamped to ``ratio``. The boxes are the draws: chosen on the host, then moved.
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic", tries: int = 10):
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.size, self.scale, self.ratio, self.interpolation, self.tries = size, scale, ratio, interpolation, tries

    def sample_boxes(self, batch: int, height: int, width: int, rng: Random) -> Tensor:
        """``(batch, 4)`` float boxes ``(top, left, height, width)`` with integer values, on the CPU (the
        rejection sampling runs on host numbers: four ``(batch, tries)`` draws, computed in float64)."""

        def draw() -> Tensor:
            return host_rand(rng, batch, self.tries).double()

        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * draw())
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * draw())
        w = torch.sqrt(area * aspect).round()
        h = torch.sqrt(area / aspect).round()
        top = torch.minimum((draw() * (height - h + 1)).floor(), height - h)
        left = torch.minimum((draw() * (width - w + 1)).floor(), width - w)
        fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting try
        boxes = torch.cat([t.gather(1, first) for t in (top, left, h, w)], dim=1)
        fallback = torch.tensor(self._central_box(height, width), dtype=boxes.dtype, device=boxes.device)
        return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback).float()

    def _central_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Tensor:
        return self.sample_boxes(shape[0], shape[2], shape[3], rng)

    def out_shape(self, shape: Shape) -> Shape:
        return (*shape[:2], *_pair(self.size))

    def apply_draws(self, x: Tensor, draws: Tensor) -> Tensor:
        return crop_resize(x, draws, self.size, self.interpolation)


class HorizontalFlip(DrawnTransform):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Tensor:
        return host_rand(rng, shape[0])

    def apply_draws(self, x: Tensor, draws: Tensor) -> Tensor:
        return torch.where(per_sample(chosen(draws, self.p, x)), x.flip(-1), x)


class Resize(DrawnTransform):
    """Deterministic resize (antialiased): an int sets the shorter side (aspect kept), a pair sets (H, W)."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def out_shape(self, shape: Shape) -> Shape:
        h, w = shape[-2:]
        if not isinstance(self.size, int):
            return (*shape[:-2], *_pair(self.size))
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)
        return (*shape[:-2], *((self.size, new_long) if h <= w else (new_long, self.size)))

    def apply_draws(self, x: Tensor, draws: Any = None) -> Tensor:
        h, w = x.shape[-2:]
        target = tuple(self.out_shape(tuple(x.shape))[-2:])
        if target == (h, w):
            return x
        out = F.interpolate(x, size=target, mode=self.interpolation, align_corners=False, antialias=True)
        return out.clamp_(0.0, 1.0)


class CenterCrop(DrawnTransform):
    """The central ``size`` region (torchvision's rounding of the offsets)."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def out_shape(self, shape: Shape) -> Shape:
        return (*shape[:-2], *self.size)

    def apply_draws(self, x: Tensor, draws: Any = None) -> Tensor:
        (h, w), (ch, cw) = x.shape[-2:], self.size
        if ch > h or cw > w:
            raise ValueError(f"center crop {ch}x{cw} larger than the {h}x{w} image")
        top, left = int(round((h - ch) / 2)), int(round((w - cw) / 2))
        return x[..., top:top + ch, left:left + cw]


class Normalize(DrawnTransform):
    """``(x − mean) / std`` per channel; ``None`` picks :func:`normalization_stats` for the batch's channels.

    The mean and std tensors are made once per (device, dtype, channels) and kept, so later steps copy nothing.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.mean, self.std = mean, std
        self._stats: dict[tuple, tuple[Tensor, Tensor]] = {}

    def apply_draws(self, x: Tensor, draws: Any = None) -> Tensor:
        key = (x.device, x.dtype, x.shape[1])
        if key not in self._stats:
            mean, std = normalization_stats(x.shape[1], self.mean, self.std)
            self._stats[key] = x.new_tensor(mean).view(1, -1, 1, 1), x.new_tensor(std).view(1, -1, 1, 1)
        mean_t, std_t = self._stats[key]
        return (x - mean_t) / std_t

    def __getstate__(self) -> dict:
        """The configuration without the per-device tensors: what a copy or the feature cache's key of an
        evaluation transform must see (the tensors are made again on first use)."""
        return {"mean": self.mean, "std": self.std}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["mean"], state["std"])


class Compose(DrawnTransform):
    """Apply transforms in order, sharing one random source; ``Compose([])`` is the identity.

    Made of :class:`DrawnTransform` parts, it draws for all of them first (same numbers, same order: no draw
    depends on pixels) and applies them after one move; other callables are called in turn with ``rng``.
    """

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    @property
    def plannable(self) -> bool:  # type: ignore[override]
        return all(plannable(t) for t in self.transforms)

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> list:
        draws = []
        for transform in self.transforms:
            draws.append(transform.draw(shape, dtype, rng))
            shape = transform.out_shape(shape)
        return draws

    def out_shape(self, shape: Shape) -> Shape:
        for transform in self.transforms:
            shape = transform.out_shape(shape)
        return shape

    def apply_draws(self, x: Tensor, draws: list) -> Tensor:
        for transform, drawn in zip(self.transforms, draws):
            x = transform.apply_draws(x, drawn)
        return x

    def __call__(self, x: Tensor, rng: Random | None = None) -> Tensor:
        if self.plannable:
            return super().__call__(x, rng)
        for transform in self.transforms:
            x = transform(x, rng)
        return x
