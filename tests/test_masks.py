from __future__ import annotations

import random

import pytest
import torch

from sslbench.core.errors import UserError
from sslbench.core.masks import (_place_blocks, blockwise_mask, random_drop_mask, random_replace_mask,
                            random_split_mask)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_drop_mask_matches_mae_shuffle():
    batch, n, ratio = 5, 49, 0.75
    drop, masked, ids_restore = random_drop_mask(batch, n, ratio, gen())
    num_keep = int(n * (1 - ratio))
    assert drop.keep.shape == (batch, num_keep) and num_keep == 12
    assert masked.dtype == torch.bool and (masked.sum(1) == n - num_keep).all()
    for b in range(batch):
        kept = set(drop.keep[b].tolist())
        assert len(kept) == num_keep
        assert kept == set((~masked[b]).nonzero().flatten().tolist())
    # MAE's decoder: [kept tokens, mask tokens] gathered with ids_restore is back in patch order
    patches = torch.arange(n).repeat(batch, 1)
    shuffled = torch.cat([torch.gather(patches, 1, drop.keep),
                          torch.full((batch, n - num_keep), -1)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert torch.equal(restored == -1, masked)
    assert torch.equal(restored[~masked], patches[~masked])


def test_drop_mask_is_reproducible_and_per_sample():
    a, _, _ = random_drop_mask(4, 49, 0.5, gen(3))
    b, _, _ = random_drop_mask(4, 49, 0.5, gen(3))
    c, _, _ = random_drop_mask(4, 49, 0.5, gen(4))
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, c.keep)
    assert len({tuple(sorted(row.tolist())) for row in a.keep}) == 4  # a different mask per image


def test_replace_mask_counts():
    masked = random_replace_mask(6, 49, 0.4, gen())
    assert masked.shape == (6, 49) and (masked.sum(1) == round(0.4 * 49)).all()
    assert not random_replace_mask(2, 49, 0.0, gen()).any()


@pytest.mark.parametrize("grid_h, grid_w, ratio, unit", [(14, 14, 0.75, 2), (7, 7, 0.4, 1), (7, 7, 0.75, 2),
                                                       (8, 6, 0.3, 2), (4, 4, 0.9, 1)])
def test_blockwise_mask_has_exact_count(grid_h, grid_w, ratio, unit):
    masked = blockwise_mask(16, grid_h, grid_w, ratio, unit, gen(1))
    assert masked.shape == (16, grid_h * grid_w) and masked.dtype == torch.bool
    assert (masked.sum(1) == round(ratio * grid_h * grid_w)).all()


def test_blockwise_mask_is_made_of_units_and_blocks():
    # ConMIM at 224 px / patch 16: 14x14 patches, 2x2-patch units; 147 of 196 patches masked
    masked = blockwise_mask(64, 14, 14, 0.75, 2, gen(2)).reshape(64, 7, 2, 7, 2)
    per_unit = masked.sum(dim=(2, 4))  # patches masked in each 2x2 unit
    uniform = ((per_unit == 0) | (per_unit == 4)).float().mean().item()
    # only the top-up / trim touches single patches: almost every unit is all-or-nothing, whereas i.i.d.
    # masking at 0.75 leaves a unit uniform with probability 0.75^4 + 0.25^4 = 0.32
    assert uniform > 0.9


def masked_neighbours(cells: torch.Tensor) -> float:
    """Mean number of masked 4-neighbours of a masked cell, over (B, H, W) 0/1 cells."""
    kernel = torch.tensor([[[[0., 1, 0], [1, 0, 1], [0, 1, 0]]]])
    neighbours = torch.nn.functional.conv2d(cells[:, None], kernel, padding=1)[:, 0]
    return ((neighbours * cells).sum() / cells.sum()).item()


def test_blockwise_mask_forms_blocks_not_scattered_units():
    # at ratio 0.4 on a 7x7 unit grid, i.i.d. masked units have ~1.35 masked neighbours; blocks ~2.7
    units = (blockwise_mask(64, 14, 14, 0.4, 2, gen(2)).reshape(64, 7, 2, 7, 2).sum(dim=(2, 4)) >= 2).float()
    scattered = random_replace_mask(64, 49, 0.4, gen(2)).float().reshape(64, 7, 7)
    assert masked_neighbours(scattered) < 1.6
    assert masked_neighbours(units) > 2.2


def test_place_blocks_never_exceeds_target():
    rng = random.Random(0)
    for target in (1, 5, 20, 37, 49):
        grid = _place_blocks(rng, 7, 7, target, 4, (0.3, 1 / 0.3))
        assert sum(map(sum, grid)) <= target


def test_blockwise_mask_reproducible():
    assert torch.equal(blockwise_mask(4, 14, 14, 0.75, 2, gen(5)), blockwise_mask(4, 14, 14, 0.75, 2, gen(5)))


def test_split_mask_micl_sizes_and_disjoint():
    # MiCL at 224 px / patch 16, ratio 0.9: int(196 * 0.1) // 2 * 2 = 18 kept, 9 per view
    split = random_split_mask(3, 196, 0.9, 2, gen())
    assert split.groups.shape == (3, 2, 9) and split.num_splits == 2
    for b in range(3):
        first, second = set(split.groups[b, 0].tolist()), set(split.groups[b, 1].tolist())
        assert len(first) == len(second) == 9 and not first & second
        assert all(0 <= i < 196 for i in first | second)
    three = random_split_mask(2, 49, 0.5, 3, gen())
    assert three.groups.shape == (2, 3, 8)
    assert all(len(set(three.groups[b].flatten().tolist())) == 24 for b in range(2))


def test_mask_errors_are_user_errors():
    with pytest.raises(UserError, match="ratio"):
        random_drop_mask(2, 49, 1.0, gen())
    with pytest.raises(UserError, match="no patch"):
        random_drop_mask(2, 4, 0.9, gen())
    with pytest.raises(UserError, match="per split"):
        random_split_mask(2, 16, 0.95, 2, gen())
