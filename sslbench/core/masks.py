"""The three ways a masked-image method hides patches from the encoder, and their random generators.

* :class:`DropMask` — MAE (He et al. 2021): masked patch tokens are removed; only the kept ones (plus CLS)
  enter the encoder.
* :class:`ReplaceMask` — ConMIM (Yi et al. 2023), MimCo (Zhou et al. 2022): masked patch embeddings are
  replaced by a learned mask token before position embeddings are added; the sequence length is kept.
* :class:`SplitMask` — MiCL (Yang & Xu 2024): the kept patches are split into S disjoint groups, each of
  which becomes its own sequence with its own CLS token.

A mask is a small dataclass of index/boolean tensors; :class:`sslbench.core.backbone.Backbone` dispatches on its
type. Every generator is batched (one call per batch, a different mask per image) and takes an optional
``torch.Generator`` so that runs are reproducible.

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


def _exactly(masked: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """Make every row of ``masked`` have exactly ``count`` True entries, changing as few as possible.

    Rows with too many masked patches lose random ones, rows with too few gain random ones: each entry's key
    is ``2*masked + u`` with u uniform in [0, 1), so the top-``count`` keys take masked entries first and
    break ties at random.
    """
    keys = masked.float() * 2 + _uniform(tuple(masked.shape), generator, masked.device)
    top = keys.topk(count, dim=1).indices
    return torch.zeros_like(masked).scatter_(1, top, True)


def random_replace_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """A (B, N) bool mask with exactly ``round(ratio * N)`` uniformly random True (= replaced) patches a row."""
    _check_ratio(ratio)
    count = round(ratio * num_patches)
    noise = _uniform((batch, num_patches), generator, device)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return ranks < count


def _place_blocks(rng: random.Random, height: int, width: int, target: int, min_block: int,
                  aspect: tuple[float, float]) -> list[list[bool]]:
    """BEiT-style block-wise masking (Bao et al. 2022, Alg. 1) on a ``height x width`` grid.

    Rectangles of random area (between ``min_block`` and what is still missing) and log-uniform aspect ratio
    are placed at random until ``target`` cells are masked or ten attempts in a row add nothing.
    """
    grid = [[False] * width for _ in range(height)]
    count = 0
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, remaining), remaining)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            h = round(math.sqrt(area * ratio))
            w = round(math.sqrt(area / ratio))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            new = sum(not grid[i][j] for i in range(top, top + h) for j in range(left, left + w))
            if 0 < new <= remaining:
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        grid[i][j] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return grid


def blockwise_mask(batch: int, grid_h: int, grid_w: int, ratio: float, unit: int = 1,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None, *,
                   min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """Block-wise masks (BEiT; ConMIM's 32-px units), exactly ``round(ratio * N)`` True patches per row.

    Blocks are placed on a coarse grid of ``unit x unit``-patch cells (ConMIM at 224 px, patch 16: unit 2,
    a 7x7 cell grid) and then expanded to patches. Because cells hold ``unit**2`` patches, the count is then
    topped up or trimmed at random so every row has the same number of masked patches (a batch of
    sequences must be rectangular for the losses). ``min_block`` is the smallest block in cells.
    Returns a (B, grid_h * grid_w) bool tensor in row-major patch order.
    """
    _check_ratio(ratio)
    if unit < 1:
        raise UserError(f"block-wise mask unit must be >= 1 patch, got {unit}")
    cells_h, cells_w = math.ceil(grid_h / unit), math.ceil(grid_w / unit)
    target_cells = round(ratio * cells_h * cells_w)
    # one Python RNG seeded from the torch generator: the block placement is scalar, sequential work
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = random.Random(seed)
    cells = torch.tensor([_place_blocks(rng, cells_h, cells_w, target_cells, min_block, aspect)
                          for _ in range(batch)], dtype=torch.bool).reshape(batch, cells_h, cells_w)
    patches = cells.repeat_interleave(unit, 1).repeat_interleave(unit, 2)[:, :grid_h, :grid_w]
    masked = patches.reshape(batch, grid_h * grid_w).to(device if device is not None else "cpu")
    return _exactly(masked, round(ratio * grid_h * grid_w), generator)


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
