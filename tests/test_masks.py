from __future__ import annotations

import math
import random

import pytest
import torch

from sslbench.core.errors import UserError
from sslbench.core.masks import (
    _beit_blocks, block_mask, keyed_seeds, mask_unit_patches, random_drop_mask, random_replace_mask,
    random_split_mask, random_unit_mask, unit_mask_count,
)
from sslbench.core.rng import KeyedRandom


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


# ------------------------------------------------------------------------------------ ConMIM's official modes


def regions(mask: torch.Tensor, side: int, value: bool) -> list[int]:
    """Number of 4-connected regions of cells equal to ``value``, per (side·side,) row of ``mask``."""
    counts = []
    for row in mask.view(-1, side, side).tolist():
        seen, count = set(), 0
        for start in ((i, j) for i in range(side) for j in range(side) if row[i][j] == value):
            if start in seen:
                continue
            count, stack = count + 1, [start]
            seen.add(start)
            while stack:
                i, j = stack.pop()
                for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                    if 0 <= a < side and 0 <= b < side and row[a][b] == value and (a, b) not in seen:
                        seen.add((a, b))
                        stack.append((a, b))
        counts.append(count)
    return counts


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def test_mask_unit_in_whole_patches_must_tile_the_grid():
    assert mask_unit_patches(32, 16, (14, 14)) == 2             # ConMIM: 32-px units of 2x2 patches
    assert mask_unit_patches(7, 7, (4, 4)) == 1
    assert mask_unit_patches(28, 16, (14, 14)) == 2             # 1.75 patches round to 2
    assert mask_unit_patches(4, 16, (14, 14)) == 1              # never less than one patch
    assert mask_unit_patches(64, 16, (8, 12)) == 4
    with pytest.raises(UserError, match="48 px is 3 patches of 16 px a side, which does not tile the 14x14"):
        mask_unit_patches(48, 16, (14, 14))
    with pytest.raises(UserError, match="does not tile the 4x4"):
        mask_unit_patches(21, 7, (4, 4))


def test_unit_count_rounds_up_as_random_mps32():
    assert unit_mask_count(49, 0.75) == 37                      # 148 of 196 patches
    assert unit_mask_count(16, 0.75) == 12
    assert unit_mask_count(10, 0.7) == 7                        # 0.7 · 10 is 7.000000000000001 in floats
    assert unit_mask_count(49, 0.0) == 0 and unit_mask_count(49, 1.0) == 49
    with pytest.raises(UserError, match="ratio"):
        unit_mask_count(49, 1.5)


def test_random_unit_mask_statistics_at_224_px():
    # ConMIM's ViT-L recipe: 37 of the 49 32-px units (2x2 patches at patch 16) drawn uniformly
    n = 2000
    masked = random_unit_mask(KeyedRandom(0, 1, torch.arange(n)).rand(49), (14, 14), 2, 37)
    assert masked.shape == (n, 196) and masked.dtype == torch.bool
    assert (masked.sum(1) == 148).all()                          # count exact in every mask
    per_unit = masked.view(n, 7, 2, 7, 2).sum(dim=(2, 4))
    assert ((per_unit == 0) | (per_unit == 4)).all()             # units aligned: all masked or all visible
    frequency = (per_unit == 4).float().mean(0)                  # every unit masked 37/49 = 0.755 of the time
    assert frequency.min() > 0.72 and frequency.max() < 0.79
    # the measurement of random_mps32: 7.3 visible regions per image (block-wise cells gave 2.9)
    assert 7.0 < mean(regions(masked[:300], 14, False)) < 7.8
    assert len({tuple(row.tolist()) for row in masked[:300]}) == 300


def test_random_unit_mask_by_hand():
    # 2x2 units of 2x2 patches on a 4x4 grid; the unit with the smallest noise is masked
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.4, 0.1]])
    masked = random_unit_mask(noise, (4, 4), 2, 1).view(2, 4, 4).int()
    assert masked[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert masked[1].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    two = random_unit_mask(noise, (4, 4), 2, 2).view(2, 2, 2, 2, 2)[:, :, 0, :, 0].reshape(2, 4)
    assert two.int().tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    with pytest.raises(UserError, match="does not tile"):
        random_unit_mask(torch.rand(1, 4), (6, 6), 4, 1)
    with pytest.raises(ValueError, match="noise"):
        random_unit_mask(torch.rand(1, 5), (4, 4), 2, 1)


def test_block_mask_statistics_match_the_official_generator():
    # ConMIM's default: BEiT block-wise, 75 of 196 patches, blocks of >= 16 patches, aspect 0.3 to 1/0.3. The
    # official generator, run over 20000 seeds, reaches 75 in 66.6% of the masks, never more, 74.4 on average.
    n = 1000
    masked = block_mask(keyed_seeds(KeyedRandom(0, 1, torch.arange(n)).rand(2)), (14, 14), 75)
    counts = masked.sum(1)
    assert masked.shape == (n, 196) and counts.max() == 75
    assert 0.62 < (counts == 75).float().mean() < 0.72
    assert 74.2 < counts.float().mean() < 74.8 and counts.min() >= 60
    # contiguous blocks: ~1.4 masked regions and ~1.3 visible regions an image; the same number of i.i.d.
    # patches would scatter into ~26 masked regions
    assert mean(regions(masked[:300], 14, True)) < 2.0
    assert mean(regions(masked[:300], 14, False)) < 2.0
    scattered = random_replace_mask(300, 196, 75 / 196, torch.Generator().manual_seed(0))
    assert mean(regions(scattered, 14, True)) > 20


# Recorded from the official generator (TencentARC/ConMIM masking_generator.py, MaskingGenerator((14, 14), 75,
# min_num_patches=16)) after random.seed(seed): equal seeds must give equal masks.
OFFICIAL_COUNTS = [75, 75, 75, 75, 75, 73, 75, 72, 74, 75, 73, 74, 75, 75, 74, 73, 75, 75, 75, 75,
                   72, 74, 74, 74, 75, 75, 74, 75, 75, 75, 74, 75, 75, 75, 75, 75, 75, 74, 75, 75]    # seeds 0 to 39
OFFICIAL_SEED_1 = [18, 19, 20, 32, 33, 34, 46, 47, 48, 60, 61, 62, 74, 75, 76, 88, 89, 90, 97, 98, 99, 100, 101, 102,
                   103, 104, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117, 118, 122, 123, 124, 125, 126, 127, 128,
                   129, 130, 131, 132, 136, 137, 138, 140, 141, 142, 143, 144, 150, 151, 152, 154, 155, 156, 157, 158,
                   164, 165, 166, 168, 169, 170, 171, 172, 178, 179, 180]
OFFICIAL_SEED_5 = [39, 40, 52, 53, 54, 56, 57, 58, 59, 60, 66, 67, 68, 70, 71, 72, 73, 74, 80, 81, 82, 84, 85, 86, 87,
                   88, 94, 95, 96, 98, 99, 100, 101, 102, 108, 109, 110, 112, 113, 114, 115, 116, 122, 123, 124, 126,
                   127, 128, 129, 130, 136, 137, 138, 140, 141, 142, 143, 144, 154, 155, 156, 157, 158, 168, 169, 170,
                   171, 172, 182, 183, 184, 185, 186]                                          # 73: stopped short


def test_block_mask_equals_the_official_generator_for_equal_seeds():
    masked = block_mask(list(range(40)), (14, 14), 75, min_block=16)
    assert masked.sum(1).tolist() == OFFICIAL_COUNTS
    assert masked[1].nonzero().flatten().tolist() == OFFICIAL_SEED_1
    assert masked[5].nonzero().flatten().tolist() == OFFICIAL_SEED_5


def test_block_mask_small_cases_by_hand():
    # 2x2 grid, one patch, blocks >= 1: a try fits only as a 1x1 block (sides must be < 2), so exactly one patch
    masked = block_mask(list(range(50)), (2, 2), 1, min_block=1)
    assert (masked.sum(1) == 1).all()
    assert set(masked.float().argmax(1).tolist()) == {0, 1, 2, 3}
    assert not block_mask([3, 4], (14, 14), 0).any()
    with pytest.raises(UserError, match="cannot mask 17 of the 16"):
        block_mask([0], (4, 4), 17)


def test_beit_blocks_never_exceed_the_count():
    rng = random.Random(0)
    for count in (1, 5, 20, 37, 48):
        grid = _beit_blocks(rng, 7, 7, count, 4, count, (math.log(0.3), math.log(1 / 0.3)))
        assert 0 < sum(map(sum, grid)) <= count


def test_block_mask_is_a_function_of_the_seed():
    a = block_mask([5, 6, 7], (14, 14), 75)
    assert torch.equal(a, block_mask([5, 6, 7], (14, 14), 75))
    assert torch.equal(a[1:2], block_mask([6], (14, 14), 75))
    assert not torch.equal(a[0], a[1])


def test_keyed_seeds_join_two_24_bit_draws():
    uniform = torch.tensor([[0.5, 0.25], [0.0, 1 - 2 ** -24]])
    assert keyed_seeds(uniform) == [(1 << 23 << 24) | (1 << 22), (1 << 24) - 1]


@pytest.mark.parametrize("mode", ["units", "block"])
def test_masks_of_a_sample_do_not_depend_on_who_draws_it(mode):
    """8 samples drawn at once, as two processes of 4, as 4 accumulation micro-batches of 2: the same masks."""

    def draw(index: torch.Tensor) -> torch.Tensor:
        rng = KeyedRandom(3, 17, index)
        rng.rand(5)                                               # the views draw first
        if mode == "units":
            return random_unit_mask(rng.rand(49), (14, 14), 2, 37)
        return block_mask(keyed_seeds(rng.rand(2)), (14, 14), 75)

    index = torch.arange(100, 108)
    whole = draw(index)
    assert torch.equal(whole, torch.cat([draw(part) for part in index.chunk(2)]))
    assert torch.equal(whole, torch.cat([draw(part) for part in index.chunk(4)]))
    assert len({tuple(row.tolist()) for row in whole}) == 8


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
