"""What a recipe's ``[data]`` section implies for every image a model sees: the side length and the per-channel
normalisation. Training views and evaluation read them here, so both always agree."""

from __future__ import annotations

from sslbench.data.transforms import normalization_stats


def normalisation(recipe, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``data.mean``/``data.std`` of the (typed) recipe when both are given, else ImageNet's for 3 channels and
    0.5/0.5 otherwise."""
    data = recipe.data
    if data.mean is not None and data.std is not None:
        return tuple(data.mean), tuple(data.std)
    return normalization_stats(channels)


def image_size(recipe, backbone=None) -> int | None:
    """``data.image_size``, else ``backbone.img_size`` of the recipe, else the built backbone's."""
    size = recipe.data.image_size or recipe.backbone.img_size
    if size is None and backbone is not None:
        size = backbone.img_size
    return size
