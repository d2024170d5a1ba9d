"""Batched, vectorised image transforms: every one draws its random parameters per sample and applies them to
the whole batch at once.

Every transform takes a float batch ``(B, C, H, W)`` in ``[0, 1]`` and a random source, draws its random
parameters **per sample**, and applies them to the whole batch at once — no Python loop over samples, no PIL. So
augmentation runs on the training device and costs far less than the forward pass. The random source is either a
``torch.Generator`` or per-sample streams (:class:`PerSampleRandom`, the trainer's ``KeyedRandom``); the same
source state gives the same output.

Semantics follow torchvision's transforms (crop-then-resize random-resized-crop, blend-based colour jitter with
torchvision's grey weights, reflect-padded Gaussian blur); deviations are noted where they occur. The view
pipelines that objectives declare are built from these in :mod:`sslbench.data.views`.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


class PerSampleRandom(Protocol):
    """Per-sample random streams (e.g. :class:`sslbench.core.rng.KeyedRandom`): ``rand(*shape)`` → ``(B, *shape)``.

    The trainer keys them by (seed, step, dataset index), so a sample gets the same augmentation whichever
    process holds it — N processes reproduce the 1-process run.
    """

    def rand(self, *shape: int) -> Tensor: ...


Random = Union[torch.Generator, PerSampleRandom]
Transform = Callable[[Tensor, Random], Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.5,)
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


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


def _rand(rng: Random, n: int, like: Tensor, *shape: int) -> Tensor:
    """Uniform ``[0, 1)`` of shape ``(n, *shape)`` on ``like``'s device and dtype, from either kind of source."""
    if isinstance(rng, torch.Generator):
        out = torch.rand(n, *shape, generator=rng, device=rng.device)
    else:
        out = rng.rand(*shape)
        if out.shape[0] != n:
            raise ValueError(f"per-sample random source has {out.shape[0]} streams for a batch of {n}")
    return out.to(like.device, like.dtype)


def _uniform(rng: Random, n: int, low: float, high: float, like: Tensor) -> Tensor:
    return low + (high - low) * _rand(rng, n, like)


def _chosen(rng: Random, n: int, p: float, like: Tensor) -> Tensor:
    """Boolean ``(n,)``: which samples a probability-``p`` transform applies to."""
    return _rand(rng, n, like) < p


def _per_sample(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(1)


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


class RandomResizedCrop:
    """Random box of ``scale`` × image area and aspect ratio in ``ratio``, resized to ``size`` (Szegedy et al. 2015).

    Boxes follow torchvision's rule, vectorised: 10 tries of (uniform area fraction, log-uniform aspect ratio),
    integer sides by rounding, uniform integer position; the first try that fits wins, else the central crop
    with the ratio clamped to ``ratio``.
    """

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic", tries: int = 10):
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.size, self.scale, self.ratio, self.interpolation, self.tries = size, scale, ratio, interpolation, tries

    def sample_boxes(self, batch: int, height: int, width: int, rng: Random) -> Tensor:
        """``(batch, 4)`` float boxes ``(top, left, height, width)`` with integer values, on the CPU."""
        cpu64 = torch.empty(0, dtype=torch.float64)

        def draw() -> Tensor:
            return _rand(rng, batch, cpu64, self.tries)

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

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        boxes = self.sample_boxes(x.shape[0], x.shape[2], x.shape[3], rng)
        return crop_resize(x, boxes, self.size, self.interpolation)


class HorizontalFlip:
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        return torch.where(_per_sample(_chosen(rng, x.shape[0], self.p, x)), x.flip(-1), x)


class Resize:
    """Deterministic resize (antialiased): an int sets the shorter side (aspect kept), a pair sets (H, W)."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bicubic"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, x: Tensor, rng: Random | None = None) -> Tensor:
        h, w = x.shape[-2:]
        if isinstance(self.size, int):
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            target = (self.size, new_long) if h <= w else (new_long, self.size)
        else:
            target = _pair(self.size)
        if target == (h, w):
            return x
        out = F.interpolate(x, size=target, mode=self.interpolation, align_corners=False, antialias=True)
        return out.clamp_(0.0, 1.0)


class CenterCrop:
    """The central ``size`` region (torchvision's rounding of the offsets)."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, x: Tensor, rng: Random | None = None) -> Tensor:
        (h, w), (ch, cw) = x.shape[-2:], self.size
        if ch > h or cw > w:
            raise ValueError(f"center crop {ch}x{cw} larger than the {h}x{w} image")
        top, left = int(round((h - ch) / 2)), int(round((w - cw) / 2))
        return x[..., top:top + ch, left:left + cw]


# ----------------------------------------------------------------------------------------------- photometric

def rgb_to_hsv(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] → HSV with hue in [0, 1)."""
    r, g, b = x.unbind(1)
    value, _ = x.max(dim=1)
    delta = value - x.min(dim=1).values
    saturation = delta / value.clamp_min(1e-12)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue)) % 1.0
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`, closed form: channel n ∈ (5, 3, 1) = v − v·s·clamp(min(k, 4−k), 0, 1),
    k = (n + 6h) mod 6."""
    hue, saturation, value = x.unbind(1)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)


class ColorJitter:
    """With probability ``p``: brightness, contrast, saturation, hue jitter, as torchvision defines each.

    Factors are uniform in ``[max(0, 1−a), 1+a]`` (hue shift in ``[−hue, hue]``), one set per sample. Fixed
    order brightness → contrast → saturation → hue (torchvision shuffles the order per call; we do not).
    Hue is rotated in HSV space. For 1-channel images only brightness and contrast apply.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def sample_params(self, batch: int, rng: Random, like: Tensor) -> dict[str, Tensor]:
        def factor(a: float) -> Tensor:
            return _uniform(rng, batch, max(0.0, 1 - a), 1 + a, like).view(-1, 1, 1, 1)

        return {"apply": _chosen(rng, batch, self.p, like), "brightness": factor(self.brightness),
                "contrast": factor(self.contrast), "saturation": factor(self.saturation),
                "hue": _uniform(rng, batch, -self.hue, self.hue, like).view(-1, 1, 1)}

    @staticmethod
    def apply(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        if not params["apply"].any():
            return x
        out = (x * params["brightness"]).clamp(0, 1)
        grey = _grey(out) if x.shape[1] == 3 else out
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        out = (params["contrast"] * out + (1 - params["contrast"]) * mean).clamp(0, 1)
        if x.shape[1] == 3:
            out = (params["saturation"] * out + (1 - params["saturation"]) * _grey(out)).clamp(0, 1)
            hsv = rgb_to_hsv(out)
            hsv = torch.stack([(hsv[:, 0] + params["hue"]) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            out = hsv_to_rgb(hsv)
        return torch.where(_per_sample(params["apply"]), out, x)

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        return self.apply(x, self.sample_params(x.shape[0], rng, x))


class Grayscale:
    """With probability ``p``, replace RGB by its luma (kept as 3 channels); 1-channel images are unchanged."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        chosen = _chosen(rng, x.shape[0], self.p, x)
        return torch.where(_per_sample(chosen), _grey(x).expand_as(x), x) if x.shape[1] == 3 else x


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """``(n, kernel_size)`` normalised 1-D Gaussians, one per sigma (torchvision's kernel)."""
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (x / sigma.view(-1, 1)) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma``: two depthwise convolutions, reflect padding."""
    b, c, h, w = x.shape
    pad = kernel_size // 2
    weight = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    flat = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weight.view(b * c, 1, kernel_size, 1), groups=b * c)
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, kernel_size), groups=b * c)
    return flat.view(b, c, h, w)


class GaussianBlur:
    """With probability ``p``, Gaussian blur with sigma uniform in ``sigma`` per sample (SimCLR/BYOL/DINO).

    The kernel side is ``kernel_size`` or, by default, ``kernel_fraction`` × image side rounded to an odd number
    ≥ 3 (23 px at 224, as in BYOL); only the chosen samples are convolved.
    """

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), kernel_fraction: float = 0.1,
                 kernel_size: int | None = None):
        self.p, self.sigma, self.kernel_fraction, self.kernel_size = p, sigma, kernel_fraction, kernel_size

    def kernel_size_for(self, height: int, width: int) -> int:
        size = self.kernel_size or max(3, int(round(self.kernel_fraction * min(height, width))))
        size = size if size % 2 else size + 1
        largest = 2 * min(height, width) - 1  # reflect padding needs pad < image side
        return min(size, largest if largest % 2 else largest - 1)

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        chosen = _chosen(rng, x.shape[0], self.p, x)
        sigma = _uniform(rng, x.shape[0], self.sigma[0], self.sigma[1], x)
        index = chosen.nonzero().flatten()
        if index.numel() == 0:
            return x
        blurred = blur(x[index], sigma[index], self.kernel_size_for(*x.shape[-2:]))
        return x.index_copy(0, index, blurred)


class Solarize:
    """With probability ``p``, invert the pixels at or above ``threshold`` (BYOL)."""

    def __init__(self, p: float = 0.2, threshold: float = 0.5):
        self.p, self.threshold = p, threshold

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        chosen = _per_sample(_chosen(rng, x.shape[0], self.p, x))
        return torch.where(chosen & (x >= self.threshold), 1 - x, x)


class Normalize:
    """``(x − mean) / std`` per channel; ``None`` picks :func:`normalization_stats` for the batch's channels."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.mean, self.std = mean, std

    def __call__(self, x: Tensor, rng: Random | None = None) -> Tensor:
        mean, std = normalization_stats(x.shape[1], self.mean, self.std)
        return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


class Compose:
    """Apply transforms in order, sharing one random source; ``Compose([])`` is the identity."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, rng: Random) -> Tensor:
        for transform in self.transforms:
            x = transform(x, rng)
        return x
