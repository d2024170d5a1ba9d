"""Batched transforms checked against torchvision's functional ops, colorsys and direct slicing, plus statistical
checks of the per-sample random parameters."""

from __future__ import annotations

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop as TorchvisionRRC

from sslbench.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, ColorJitter, GaussianBlur, Grayscale, HorizontalFlip, Normalize, RandomResizedCrop,
    Solarize, blur, crop_resize, hsv_to_rgb, normalization_stats, rgb_to_hsv, to_float,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 8, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(seed))


# ------------------------------------------------------------------------------------------ random resized crop

@pytest.mark.parametrize("height,width", [(28, 28), (20, 40)])
def test_rrc_boxes_respect_scale_ratio_and_image(height, width):
    scale, ratio = (0.2, 0.6), (3 / 4, 4 / 3)
    boxes = RandomResizedCrop(16, scale, ratio).sample_boxes(4000, height, width, gen())
    top, left, h, w = boxes.double().unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = height * width
    # Sides are rounded, so the area and ratio bounds hold up to half a pixel per side.
    assert ((h - 0.5) * (w - 0.5) <= scale[1] * area + 1e-9).all()
    assert ((h + 0.5) * (w + 0.5) >= scale[0] * area - 1e-9).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all() and ((w + 0.5) / (h - 0.5) >= ratio[0]).all()


def test_rrc_area_distribution_matches_torchvision():
    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 4000
    ours = RandomResizedCrop(16, scale, ratio).sample_boxes(n, 32, 32, gen(1))
    ours_area = (ours[:, 2] * ours[:, 3] / 1024).double()
    torch.manual_seed(1)
    reference = torch.tensor([TorchvisionRRC.get_params(torch.zeros(1, 32, 32), list(scale), list(ratio))
                              for _ in range(n)], dtype=torch.float64)
    ref_area = reference[:, 2] * reference[:, 3] / 1024
    # Same sampling rule => same distribution: means within ~4 standard errors, similar quantiles.
    se = math.sqrt(ours_area.var() / n + ref_area.var() / n)
    assert abs(ours_area.mean() - ref_area.mean()) < 4 * se
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(ours_area.quantile(q), ref_area.quantile(q), atol=0.04)


def test_rrc_falls_back_to_central_crop():
    # An impossible scale never fits, so every box is torchvision's fallback: ratio clamped, centred.
    boxes = RandomResizedCrop(8, scale=(2.0, 3.0)).sample_boxes(5, 20, 40, gen())
    expected = torch.tensor([0.0, 6.0, 20.0, 27.0])  # w = round(20 * 4/3) = 27, left = (40 - 27) // 2
    assert torch.equal(boxes, expected.expand(5, 4))
    square = RandomResizedCrop(8, scale=(2.0, 3.0)).sample_boxes(3, 16, 16, gen())
    assert torch.equal(square, torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(3, 4))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_of_the_full_box_is_a_resize(mode):
    x = images()
    boxes = torch.tensor([[0.0, 0.0, 20.0, 24.0]]).expand(8, 4)
    for size in [(40, 48), (13, 7)]:
        expected = F.interpolate(x, size=size, mode=mode, align_corners=False)
        expected = expected.clamp(0, 1) if mode == "bicubic" else expected
        assert torch.allclose(crop_resize(x, boxes, size, mode), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(10, 12), (20, 24), (5, 6), (17, 9)])
def test_crop_matches_slice_then_interpolate_bilinear(size):
    x = images()
    box = (3, 5, 10, 12)  # top, left, height, width — an interior box, so edge handling matters
    boxes = torch.tensor(box, dtype=torch.float32).expand(8, 4)
    crop = x[:, :, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    expected = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(crop_resize(x, boxes, size, "bilinear"), expected, atol=1e-5)


def test_crop_matches_slice_then_interpolate_bicubic_away_from_the_box_edge():
    x = images()
    box = (3, 5, 10, 12)
    boxes = torch.tensor(box, dtype=torch.float32).expand(8, 4)
    crop = x[:, :, 3:13, 5:17]
    assert torch.allclose(crop_resize(x, boxes, (10, 12), "bicubic"), crop, atol=1e-6)  # same size: the slice
    expected = F.interpolate(crop, size=(20, 24), mode="bicubic", align_corners=False).clamp(0, 1)
    ours = crop_resize(x, boxes, (20, 24), "bicubic")
    # Bicubic taps reach 2 source pixels out; 3 output pixels from each edge they stay inside the box, where
    # our crop (which reads the real neighbours) and slice-then-resize (which replicates the edge) agree.
    assert torch.allclose(ours[..., 3:-3, 3:-3], expected[..., 3:-3, 3:-3], atol=1e-5)


def test_rrc_applies_its_sampled_boxes():
    x = images(b=6)
    rrc = RandomResizedCrop((9, 11), scale=(0.3, 0.9), interpolation="bilinear")
    boxes = rrc.sample_boxes(6, 20, 24, gen(5))
    out = rrc(x, gen(5))
    for i, (t, l, h, w) in enumerate(boxes.long().tolist()):
        expected = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(9, 11), mode="bilinear", align_corners=False)
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5)


# -------------------------------------------------------------------------------------------------- flip

def test_flip_frequency_and_content():
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(4000, 1, 3, 6) / 6
    out = HorizontalFlip(p=0.3)(x, gen())
    flipped = (out[:, 0, 0, 0] > 0.5)
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    rate, sd = flipped.float().mean().item(), math.sqrt(0.3 * 0.7 / 4000)
    assert abs(rate - 0.3) < 4 * sd


# ------------------------------------------------------------------------------------------------ colour

def test_hsv_conversion_matches_colorsys():
    x = torch.rand(1, 3, 7, 9, generator=gen(2))
    x[0, :, 0, 0] = torch.tensor([0.4, 0.4, 0.4])  # grey: hue and saturation 0
    x[0, :, 0, 1] = 0.0  # black
    hsv = rgb_to_hsv(x)
    for i in range(7):
        for j in range(9):
            expected = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            assert torch.allclose(hsv[0, :, i, j], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-5)


def test_color_jitter_matches_torchvision_functional_ops():
    x = images(b=6, c=3)
    jitter = ColorJitter(0.4, 0.4, 0.3, 0.1, p=0.5)
    params = jitter.sample_params(6, gen(1), x)
    out = jitter.apply(x, params)
    assert params["apply"].any() and not params["apply"].all()
    for i in range(6):
        if not params["apply"][i]:
            assert torch.equal(out[i], x[i])
            continue
        ref = TF.adjust_brightness(x[i], params["brightness"][i].item())
        ref = TF.adjust_contrast(ref, params["contrast"][i].item())
        ref = TF.adjust_saturation(ref, params["saturation"][i].item())
        ref = TF.adjust_hue(ref, params["hue"][i].item())
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_color_jitter_on_grey_images_changes_only_brightness_and_contrast():
    x = images(b=4, c=1)
    jitter = ColorJitter(0.4, 0.4, 0.9, 0.5, p=1.0)
    params = jitter.sample_params(4, gen(4), x)
    out = jitter.apply(x, params)
    for i in range(4):
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], params["brightness"][i].item()),
                                 params["contrast"][i].item())
        assert torch.allclose(out[i], ref, atol=1e-6)


def test_grayscale_uses_luma_and_leaves_grey_images():
    x = images(b=4000, c=3, h=2, w=2)
    out = Grayscale(p=0.25)(x, gen())
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert torch.allclose(out[grey], TF.rgb_to_grayscale(x[grey], num_output_channels=3), atol=1e-6)
    assert torch.equal(out[~grey], x[~grey])
    assert abs(grey.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    one = images(c=1)
    assert torch.equal(Grayscale(p=1.0)(one, gen()), one)


def test_solarize_inverts_above_threshold():
    x = images()
    assert torch.equal(Solarize(p=1.0, threshold=0.3)(x, gen()), torch.where(x >= 0.3, 1 - x, x))
    assert torch.equal(Solarize(p=0.0)(x, gen()), x)


# -------------------------------------------------------------------------------------------------- blur

def test_blur_matches_torchvision_per_sample_sigma():
    x = images(b=4, c=3, h=16, w=18)
    sigma = torch.tensor([0.3, 0.9, 1.5, 2.0])
    out = blur(x, sigma, 5)
    for i in range(4):
        ref = TF.gaussian_blur(x[i:i + 1], [5, 5], [sigma[i].item()] * 2)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-6)


def test_blur_with_tiny_sigma_is_identity_and_constant_stays_constant():
    x = images()
    assert torch.allclose(GaussianBlur(p=1.0, sigma=(1e-6, 1e-6))(x, gen()), x, atol=1e-7)
    flat = torch.full((3, 1, 12, 12), 0.37)
    assert torch.allclose(GaussianBlur(p=1.0, sigma=(2.0, 2.0), kernel_size=7)(flat, gen()), flat, atol=1e-6)


def test_blur_probability_and_kernel_size():
    x = images(b=2000, c=1, h=8, w=8)
    out = GaussianBlur(p=0.1)(x, gen())
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert abs(changed - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 2000)
    assert GaussianBlur().kernel_size_for(224, 224) == 23  # BYOL's 23 px at 224
    assert GaussianBlur().kernel_size_for(32, 32) == 3
    assert GaussianBlur(kernel_size=31).kernel_size_for(8, 8) == 15  # reflect padding needs pad < side


# --------------------------------------------------------------------------------- deterministic transforms

def test_normalize_defaults_by_channel_count():
    grey, rgb = images(c=1), images(c=3)
    assert torch.allclose(Normalize()(grey), (grey - 0.5) / 0.5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(Normalize()(rgb), (rgb - mean) / std)
    assert normalization_stats(1, [0.2], [0.4]) == ((0.2,), (0.4,))
    with pytest.raises(ValueError, match="3 channels"):
        normalization_stats(3, [0.5], [0.5])


def test_to_float_scales_uint8_only():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(u8), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.rand(3)
    assert to_float(f) is f


def test_normalize_is_described_by_its_configuration_not_its_device_tensors():
    """The feature cache keys an evaluation transform by its description: using Normalize (which keeps its mean and
    std tensors per device) must not change it, or every extraction would miss the cache."""
    import copy

    from sslbench.data.transforms import Normalize
    from sslbench.evaluation.cache import transform_description

    normalize = Normalize([0.5], [0.25])
    before = transform_description(normalize)
    out = normalize(torch.full((2, 1, 4, 4), 0.75))
    assert torch.equal(out, torch.ones(2, 1, 4, 4))
    assert transform_description(normalize) == before
    twin = copy.deepcopy(normalize)
    assert transform_description(twin) == before and torch.equal(twin(torch.full((1, 1, 2, 2), 0.5)),
                                                                 torch.zeros(1, 1, 2, 2))
