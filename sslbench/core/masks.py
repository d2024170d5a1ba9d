"""The three ways a masked-image method hides patches from the encoder, and their random generators.

* :class:`DropMask` — MAE (He et al. 2021): masked patch tokens are removed; only the kept ones (plus CLS)
  enter the encoder.
* :class:`ReplaceMask` — ConMIM (Yi et al. 2023), MimCo (Zhou et al. 2022): masked patch embeddings are
  replaced by a learned mask token before position embeddings are added; the sequence length is kept.
* :class:`SplitMask` — MiCL (Yang & Xu 2024): the kept patches are split into S disjoint groups, each of
  which becomes its own sequence with its own CLS token.

A mask is a small dataclass of index/boolean tensors; :class:`sslbench.core.backbone.Backbone` dispatches on its
type. Every generator is batched (one call per batch, a different mask per image). An objective draws its masks
from the per-sample keyed streams (``batch.rng``): the ``*_from_noise`` functions and :func:`random_unit_mask`
take one row of uniform noise per image, :func:`block_mask` one seed per image (:func:`keyed_seeds`), so a
sample's mask depends only on (run seed, step, sample index) — not on the process or micro-batch holding it.
The ``random_*`` conveniences take an optional ``torch.Generator`` instead (tests, tools).

ConMIM's two official modes (Yi et al. 2023, TencentARC/ConMIM ``masking_generator.py``):
:func:`random_unit_mask` (``random_mps32``: whole 32-px units drawn uniformly, its ViT-L recipe) and
:func:`block_mask` (BEiT's block-wise generator on the patch grid, 75 patches, its default).

>>> g = torch.Generator().manual_seed(0)
>>> drop, masked, ids_restore = random_drop_mask(2, 16, 0.75, g)
>>> drop.keep.shape, int(masked.sum(1)[0])
(torch.Size([2, 4]), 12)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from sslbench.core.errors import UserError


@dataclass(frozen=True)
class DropMask:
    """Keep only the patch tokens at ``keep`` (B, K) — indices into the N patches, CLS excluded."""

    keep: Tensor


@dataclass(frozen=True)
class ReplaceMask:
    """Replace the patch embeddings where ``masked`` (B, N) is True by ``token`` ((1, 1, D) or (D,))."""

    masked: Tensor
    token: Tensor


@dataclass(frozen=True)
class SplitMask:
    """Make S sequences per image from the disjoint patch-index groups ``groups`` (B, S, K).

    The encoder's output batch is split-major: rows ``[s*B:(s+1)*B]`` hold split ``s`` of every image.
    """

    groups: Tensor

    @property
    def num_splits(self) -> int:
        return self.groups.shape[1]


Mask = Union[DropMask, ReplaceMask, SplitMask]


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    """Uniform noise drawn on the generator's device (torch requires they match), then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device if device is not None else source)


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"mask ratio must be in [0, 1), got {ratio}")


def random_drop_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[DropMask, Tensor, Tensor]:
    """MAE's per-sample random masking: argsort of uniform noise, keep the first ``int(N * (1 - ratio))``.

    Returns ``(DropMask, masked, ids_restore)``: ``masked`` (B, N) bool is True where a patch was dropped;
    ``ids_restore`` (B, N) un-shuffles ``[kept tokens, mask tokens]`` back to patch order, as MAE's decoder
    needs (``torch.gather(seq, 1, ids_restore)``).
    """
    return drop_mask_from_noise(_uniform((batch, num_patches), generator, device), ratio)


def drop_mask_from_noise(noise: Tensor, ratio: float) -> tuple[DropMask, Tensor, Tensor]:
    """:func:`random_drop_mask` from given (B, N) uniform noise (e.g. an objective's keyed per-sample stream)."""
    _check_ratio(ratio)
    num_patches = noise.shape[1]
    num_keep = int(num_patches * (1 - ratio))
    if num_keep < 1:
        raise UserError(f"mask ratio {ratio} keeps no patch out of {num_patches}; lower the ratio")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # position p of the shuffled order is kept iff p < num_keep; ids_restore maps patches to positions
    masked = ids_restore >= num_keep
    return DropMask(keep=ids_shuffle[:, :num_keep]), masked, ids_restore


def random_replace_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """A (B, N) bool mask with exactly ``round(ratio * N)`` uniformly random True (= replaced) patches a row."""
    _check_ratio(ratio)
    count = round(ratio * num_patches)
    noise = _uniform((batch, num_patches), generator, device)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return ranks < count


def mask_unit_patches(unit_px: int, patch_size: int, grid: tuple[int, int]) -> int:
    """Patches per side of a square mask unit of ``unit_px`` pixels: rounded to whole patches, at least one.

    The units must tile the patch grid exactly (ConMIM's ``MaskGenerator`` asserts the same), so a unit whose
    patch count does not divide both grid sides is refused.
    """
    if unit_px < 1 or patch_size < 1:
        raise UserError(f"mask unit and patch size must be >= 1 px, got {unit_px} and {patch_size}")
    unit = max(1, round(unit_px / patch_size))
    height, width = grid
    if height % unit or width % unit:
        raise UserError(f"a mask unit of {unit_px} px is {unit} patches of {patch_size} px a side, which does not "
                        f"tile the {height}x{width} patch grid; expected a unit whose patch count divides "
                        f"{height} and {width}")
    return unit


def unit_mask_count(units: int, ratio: float) -> int:
    """Units masked at ``ratio``: rounded *up*, as ConMIM's ``random_mps32`` (ceil(0.75 · 49) = 37).

    The product is rounded to 9 decimals first so that e.g. 0.7 · 10 counts 7 units, not 8.
    """
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"mask ratio must be in [0, 1], got {ratio}")
    return math.ceil(round(ratio * units, 9))


def random_unit_mask(noise: Tensor, grid: tuple[int, int], unit: int, count: int) -> Tensor:
    """ConMIM's ``random_mps32`` masks (SimMIM-style): ``count`` units drawn uniformly, each ``unit x unit`` patches.

    ``noise`` is (B, U) uniform noise, one row per image (e.g. ``batch.rng.rand(U)``), for the
    ``U = (H / unit) · (W / unit)`` units in row-major order; the ``count`` units with the smallest noise are
    masked (a stable sort, so ties break the same way on every device). Returns (B, H·W) bool, row-major
    patches, exactly ``count · unit²`` True per row. At 224 px, patch 16, 32-px units and ratio 0.75:
    37 of the 49 units, 148 of the 196 patches.
    """
    height, width = grid
    if unit < 1 or height % unit or width % unit:
        raise UserError(f"a mask unit of {unit} patches does not tile the {height}x{width} patch grid")
    rows, cols = height // unit, width // unit
    if noise.ndim != 2 or noise.shape[1] != rows * cols:
        raise ValueError(f"expected (B, {rows * cols}) noise for {rows}x{cols} units, got {tuple(noise.shape)}")
    if not 0 <= count <= rows * cols:
        raise UserError(f"cannot mask {count} of {rows * cols} mask units")
    ranks = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1)
    units = (ranks < count).view(-1, rows, cols)
    patches = units.repeat_interleave(unit, dim=1).repeat_interleave(unit, dim=2)
    return patches.reshape(noise.shape[0], height * width)


def keyed_seeds(uniform: Tensor) -> list[int]:
    """48-bit integer seeds, one per image, from (B, 2) keyed uniform draws (``batch.rng.rand(2)``).

    The keyed draws have 24 bits each and are exact in float32, so the two become one integer without loss.
    The list lives on the host: the generators it seeds (:func:`block_mask`) run in Python.
    """
    bits = (uniform.detach().to("cpu", torch.float64) * (1 << 24)).long()
    return ((bits[:, 0] << 24) | bits[:, 1]).tolist()


def _beit_blocks(rng: random.Random, height: int, width: int, count: int, min_block: int, max_block: int,
                 log_aspect: tuple[float, float]) -> list[list[bool]]:
    """BEiT's block-wise masking (Bao et al. 2022, Alg. 1) of one image, as its official generator draws it.

    Until ``count`` patches are masked: up to ten tries of a rectangle with area uniform in
    [min_block, still missing (at most max_block)] and log-uniform aspect, placed uniformly; a try that adds no
    patch or would overshoot is discarded, and ten discarded tries in a row end the mask (so it may fall a few
    patches short). Rectangles must be strictly smaller than the grid in both sides, as in the original.
    The order and kind of the calls on ``rng`` are the original's, so equal seeds give equal masks.
    """
    grid = [[False] * width for _ in range(height)]
    masked = 0
    while masked < count:
        budget = min(count - masked, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < height and w < width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            new = [(i, j) for i in range(top, top + h) for j in range(left, left + w) if not grid[i][j]]
            if 0 < len(new) <= budget:
                for i, j in new:
                    grid[i][j] = True
                added = len(new)
                break
        if added == 0:
            break
        masked += added
    return grid


def block_mask(seeds: list[int], grid: tuple[int, int], count: int, min_block: int = 16,
               max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """BEiT block-wise masks on the patch grid, ConMIM's default ``block`` mode (75 patches, blocks >= 16).

    One mask per seed, each from its own ``random.Random(seed)`` — seed it from the image's keyed stream
    (:func:`keyed_seeds`) and the mask depends only on (run seed, step, sample). At most ``count`` patches
    a row: like the original, a mask may stop a few short (at 14x14, 75 patches, blocks >= 16, about a
    third of the masks do, by 1 to 11 patches). ``max_block`` defaults to ``count``. Returns (B, H·W) bool.
    """
    height, width = grid
    if not 0 <= count <= height * width:
        raise UserError(f"cannot mask {count} of the {height * width} patches of a {height}x{width} grid")
    if min_block < 1:
        raise UserError(f"the smallest mask block must be >= 1 patch, got {min_block}")
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    rows = [_beit_blocks(random.Random(seed), height, width, count, min_block,
                         count if max_block is None else max_block, log_aspect) for seed in seeds]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(seeds), height * width)


def random_split_mask(batch: int, num_patches: int, ratio: float, splits: int = 2,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> SplitMask:
    """MiCL's split: a random permutation keeps ``int(N * (1 - ratio)) // S * S`` patches; the first K go to
    split 0, the next K to split 1, ... — S disjoint random subsets of the same image."""
    return split_mask_from_noise(_uniform((batch, num_patches), generator, device), ratio, splits)


def split_size(num_patches: int, ratio: float, splits: int = 2) -> int:
    """Patches per split of a MiCL-style split mask: ``int(N * (1 - ratio)) // S`` (0: the ratio leaves too few)."""
    return int(num_patches * (1 - ratio)) // splits


def split_mask_from_noise(noise: Tensor, ratio: float, splits: int = 2) -> SplitMask:
    """:func:`random_split_mask` from given (B, N) uniform noise (e.g. an objective's keyed per-sample stream):
    the permutation is ``argsort(noise)``."""
    _check_ratio(ratio)
    if splits < 1:
        raise UserError(f"number of splits must be >= 1, got {splits}")
    batch, num_patches = noise.shape
    per_split = split_size(num_patches, ratio, splits)
    if per_split < 1:
        raise UserError(f"mask ratio {ratio} with {splits} splits leaves no patch per split out of "
                        f"{num_patches}; lower the ratio")
    perm = torch.argsort(noise, dim=1)
    return SplitMask(groups=perm[:, :per_split * splits].reshape(batch, splits, per_split))
