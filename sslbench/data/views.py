"""The view pipelines objectives declare (N independent crops, one shared crop with per-view photometric
transforms, multi-crop), the deterministic evaluation view, and the seed papers' augmentation recipes.

Pipelines take uint8 or float images ``(B, C, H, W)`` and a random source and return a list of float views; the
transforms they are built from live in :mod:`sslbench.data.transforms` (re-exported here for convenience).

A call makes every random draw of the step in one place, on the host — :meth:`ViewPipeline.draw`, view by
view and transform by transform, in the order the transforms were always called — moves them to the images'
device in one copy (:func:`sslbench.data.draws.to_device`) and then builds the views there with tensor ops
only (:meth:`ViewPipeline.apply_draws`): no host round trip per transform. Pass a host random source (the
trainer's ``KeyedRandom`` keyed by CPU indices) to keep the draws off the device altogether.

>>> import torch
>>> pipeline = mae_views(28)
>>> views = pipeline(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.Generator().manual_seed(0))
>>> len(views), tuple(views[0].shape)
(1, (4, 1, 28, 28))
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from sslbench.data.draws import Shape, plannable, to_device

from sslbench.data.transforms import (  # noqa: F401 (re-exported: objectives import transforms and pipelines from one place)
    GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, CenterCrop, ColorJitter, Compose, GaussianBlur, Grayscale,
    HorizontalFlip, Normalize, PerSampleRandom, Random, RandomResizedCrop, Resize, Solarize, Transform,
    normalization_stats, to_float)


# -------------------------------------------------------------------------------------------------- pipelines

def _one_per_view(transforms: Transform | Sequence[Transform], n: int, what: str) -> list[Transform]:
    if callable(transforms):
        return [transforms] * n
    transforms = list(transforms)
    if len(transforms) != n:
        raise ValueError(f"{what}: {len(transforms)} transforms given for {n} views")
    return transforms


class ViewPipeline:
    """Base: uint8 or float ``(B, C, H, W)`` images + random source → ``list`` of float views.

    Pipelines do not normalise on their own: end each view's transform with :class:`Normalize` (the factories
    below do), so an objective controls exactly what its views contain.

    Subclasses give :meth:`draw` (host: all the step's draws), :meth:`apply_draws` (device) and
    :meth:`_transforms` (to tell whether every transform can be drawn ahead); a pipeline holding other callables
    calls them in turn with ``rng`` (:meth:`sequential`), as pipelines always did.
    """

    num_views: int

    def _transforms(self) -> list:
        return []

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Any:
        raise NotImplementedError

    def apply_draws(self, x: Tensor, draws: Any) -> list[Tensor]:
        raise NotImplementedError

    def sequential(self, x: Tensor, rng: Random) -> list[Tensor]:
        raise NotImplementedError

    def __call__(self, images: Tensor, rng: Random) -> list[Tensor]:
        x = to_float(images)
        if not all(plannable(t) for t in self._transforms()):
            return self.sequential(x, rng)
        return self.apply_draws(x, to_device(self.draw(tuple(x.shape), x.dtype, rng), x.device))


class IndependentCrops(ViewPipeline):
    """``n`` views, each an independent draw of ``transform`` (or of its own transform when a list is given).

    MAE: one view, RRC(0.2, 1) + flip. MAE-CT: two views, RRC(0.08, 1) + flip.
    """

    def __init__(self, n: int, transform: Transform | Sequence[Transform]):
        self.transforms = _one_per_view(transform, n, "IndependentCrops")
        self.num_views = len(self.transforms)

    def _transforms(self) -> list:
        return self.transforms

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> list:
        return [t.draw(shape, dtype, rng) for t in self.transforms]

    def apply_draws(self, x: Tensor, draws: list) -> list[Tensor]:
        return [t.apply_draws(x, d) for t, d in zip(self.transforms, draws)]

    def sequential(self, x: Tensor, rng: Random) -> list[Tensor]:
        return [t(x, rng) for t in self.transforms]


class SharedCrop(ViewPipeline):
    """One geometric ``crop`` shared by all views, then one photometric transform per view.

    Patch ``i`` of every view shows the same image region — ConMIM's student (plain) and teacher (strongly
    jittered) branches rely on this.
    """

    def __init__(self, crop: Transform, per_view: Sequence[Transform]):
        self.crop, self.per_view = crop, list(per_view)
        self.num_views = len(self.per_view)

    def _transforms(self) -> list:
        return [self.crop, *self.per_view]

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> dict:
        crop = self.crop.draw(shape, dtype, rng)
        shape = self.crop.out_shape(shape)
        return {"crop": crop, "per_view": [t.draw(shape, dtype, rng) for t in self.per_view]}

    def apply_draws(self, x: Tensor, draws: dict) -> list[Tensor]:
        crop = self.crop.apply_draws(x, draws["crop"])
        return [t.apply_draws(crop, d) for t, d in zip(self.per_view, draws["per_view"])]

    def sequential(self, x: Tensor, rng: Random) -> list[Tensor]:
        crop = self.crop(x, rng)
        return [t(crop, rng) for t in self.per_view]


class MultiCrop(ViewPipeline):
    """``global_n`` global views then ``local_n`` smaller local views (Caron et al. 2020, multi-crop).

    ``global_transform`` may be a list with one transform per global view (MIM-Refiner blurs view 1 always and
    view 2 with p 0.1, and solarises only view 2). Views are returned globals first.
    """

    def __init__(self, global_n: int, global_transform: Transform | Sequence[Transform], local_n: int = 0,
                 local_transform: Transform | None = None):
        if local_n and local_transform is None:
            raise ValueError("MultiCrop: local_n > 0 needs a local_transform")
        self.global_transforms = _one_per_view(global_transform, global_n, "MultiCrop global views")
        self.local_transform, self.num_global, self.num_local = local_transform, global_n, local_n
        self.num_views = global_n + local_n

    def _views(self) -> list:
        return self.global_transforms + [self.local_transform] * self.num_local

    def _transforms(self) -> list:
        return self._views()

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> list:
        return [t.draw(shape, dtype, rng) for t in self._views()]

    def apply_draws(self, x: Tensor, draws: list) -> list[Tensor]:
        return [t.apply_draws(x, d) for t, d in zip(self._views(), draws)]

    def sequential(self, x: Tensor, rng: Random) -> list[Tensor]:
        return [t(x, rng) for t in self._views()]


class EvalTransform:
    """Deterministic view for feature extraction: resize the shorter side to ``size / crop_fraction``, take the
    central ``size`` square, normalise. ``crop_fraction=0.875`` is the ImageNet protocol (256 → 224)."""

    def __init__(self, size: int, crop_fraction: float = 1.0, interpolation: str = "bicubic",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.resize = Resize(int(round(size / crop_fraction)), interpolation)
        self.crop, self.normalize = CenterCrop(size), Normalize(mean, std)

    def __call__(self, images: Tensor, rng: Random | None = None) -> Tensor:
        return self.normalize(self.crop(self.resize(to_float(images))))


# ------------------------------------------------------------------------- building blocks of the papers' views

def crop_flip(size: int, scale: tuple[float, float], flip: bool = True) -> list[Transform]:
    """Random-resized crop (bicubic) to ``size`` with area ``scale``, then a horizontal flip with p 0.5."""
    crop: list[Transform] = [RandomResizedCrop(size, scale, interpolation="bicubic")]
    return crop + [HorizontalFlip(0.5)] if flip else crop


def strong_photometric(blur_p: float, solarize_p: float) -> list[Transform]:
    """BYOL/DINO-style colour augmentation: jitter p 0.8 (0.4, 0.4, 0.2, 0.1), grey p 0.2, blur, solarise."""
    out: list[Transform] = [ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), Grayscale(0.2), GaussianBlur(blur_p)]
    return out + [Solarize(solarize_p)] if solarize_p > 0 else out
