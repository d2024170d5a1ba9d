"""Photometric transforms (colour jitter, greyscale, Gaussian blur, solarisation) and their colour-space helpers.

Each is a :class:`sslbench.data.draws.DrawnTransform`: ``draw`` takes its uniform numbers from the random
source on the host (in the order the transform has always used), ``apply_draws`` turns them into parameters
and applies them on the device without reading anything back. Only host-side decisions are made from the
draws before the move: whether any sample is jittered, which samples are blurred. Re-exported by
:mod:`sslbench.data.transforms`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslbench.data.draws import DrawnTransform, Random, Shape, host_rand, to_device

_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


def per_sample(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


def chosen(u: Tensor, p: float, like: Tensor) -> Tensor:
    """Boolean ``(n,)`` from moved uniforms: which samples a probability-``p`` transform applies to (compared in
    ``like``'s dtype, as always)."""
    return u.to(like.dtype) < p


def grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(1)


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


class ColorJitter(DrawnTransform):
    """With probability ``p``: brightness, contrast, saturation, hue jitter, as torchvision defines each.

    Factors are uniform in ``[max(0, 1−a), 1+a]`` (hue shift in ``[−hue, hue]``), one set per sample. Fixed
    order brightness → contrast → saturation → hue (torchvision shuffles the order per call; we do not).
    Hue is rotated in HSV space. For 1-channel images only brightness and contrast apply.

    Draws five uniforms per sample (apply, brightness, contrast, saturation, hue); a batch where no sample is
    jittered is returned untouched — decided on the host.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8):
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> dict:
        u = torch.stack([host_rand(rng, shape[0]) for _ in range(5)], dim=1)
        return {"u": u, "any": bool((u[:, 0].to(dtype) < self.p).any())}

    def params(self, u: Tensor, like: Tensor) -> dict[str, Tensor]:
        """The per-sample parameters from the ``(B, 5)`` uniforms, in ``like``'s dtype, on ``u``'s device."""
        u = u.to(like.dtype)

        def factor(i: int, a: float) -> Tensor:
            low, high = max(0.0, 1 - a), 1 + a
            return (low + (high - low) * u[:, i]).view(-1, 1, 1, 1)

        return {"apply": u[:, 0] < self.p, "brightness": factor(1, self.brightness),
                "contrast": factor(2, self.contrast), "saturation": factor(3, self.saturation),
                "hue": (-self.hue + (self.hue - -self.hue) * u[:, 4]).view(-1, 1, 1)}

    def sample_params(self, batch: int, rng: Random, like: Tensor) -> dict[str, Tensor]:
        """Draw and derive the parameters of one call (for inspection; pipelines use draw / apply_draws)."""
        return self.params(to_device(self.draw((batch,), like.dtype, rng)["u"], like.device), like)

    @staticmethod
    def apply(x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Jitter the samples where ``params["apply"]``; the others are returned unchanged."""
        out = (x * params["brightness"]).clamp(0, 1)
        grey_ = grey(out) if x.shape[1] == 3 else out
        mean = grey_.mean(dim=(1, 2, 3), keepdim=True)
        out = (params["contrast"] * out + (1 - params["contrast"]) * mean).clamp(0, 1)
        if x.shape[1] == 3:
            out = (params["saturation"] * out + (1 - params["saturation"]) * grey(out)).clamp(0, 1)
            hsv = rgb_to_hsv(out)
            hsv = torch.stack([(hsv[:, 0] + params["hue"]) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            out = hsv_to_rgb(hsv)
        return torch.where(per_sample(params["apply"]), out, x)

    def apply_draws(self, x: Tensor, draws: dict) -> Tensor:
        return self.apply(x, self.params(draws["u"], x)) if draws["any"] else x


class Grayscale(DrawnTransform):
    """With probability ``p``, replace RGB by its luma (kept as 3 channels); 1-channel images are unchanged
    (they still draw, so the streams stay aligned whatever the channel count)."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Tensor:
        return host_rand(rng, shape[0])

    def apply_draws(self, x: Tensor, draws: Tensor) -> Tensor:
        chosen_ = chosen(draws, self.p, x)
        return torch.where(per_sample(chosen_), grey(x).expand_as(x), x) if x.shape[1] == 3 else x


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


class GaussianBlur(DrawnTransform):
    """With probability ``p``, Gaussian blur with sigma uniform in ``sigma`` per sample (SimCLR/BYOL/DINO).

    The kernel side is ``kernel_size`` or, by default, ``kernel_fraction`` × image side rounded to an odd number
    ≥ 3 (23 px at 224, as in BYOL); only the chosen samples are convolved — their indices are found on the
    host, so the device never has to report how many there are.
    """

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0), kernel_fraction: float = 0.1,
                 kernel_size: int | None = None):
        self.p, self.sigma, self.kernel_fraction, self.kernel_size = p, sigma, kernel_fraction, kernel_size

    def kernel_size_for(self, height: int, width: int) -> int:
        size = self.kernel_size or max(3, int(round(self.kernel_fraction * min(height, width))))
        size = size if size % 2 else size + 1
        largest = 2 * min(height, width) - 1  # reflect padding needs pad < image side
        return min(size, largest if largest % 2 else largest - 1)

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> dict:
        chosen_ = host_rand(rng, shape[0]).to(dtype) < self.p
        return {"sigma": host_rand(rng, shape[0]), "index": chosen_.nonzero().flatten()}

    def apply_draws(self, x: Tensor, draws: dict) -> Tensor:
        index = draws["index"]
        if index.numel() == 0:
            return x
        low, high = self.sigma
        sigma = low + (high - low) * draws["sigma"].to(x.dtype)
        blurred = blur(x.index_select(0, index), sigma.index_select(0, index), self.kernel_size_for(*x.shape[-2:]))
        return x.index_copy(0, index, blurred)


class Solarize(DrawnTransform):
    """With probability ``p``, invert the pixels at or above ``threshold`` (BYOL)."""

    def __init__(self, p: float = 0.2, threshold: float = 0.5):
        self.p, self.threshold = p, threshold

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Tensor:
        return host_rand(rng, shape[0])

    def apply_draws(self, x: Tensor, draws: Tensor) -> Tensor:
        return torch.where(per_sample(chosen(draws, self.p, x)) & (x >= self.threshold), 1 - x, x)
