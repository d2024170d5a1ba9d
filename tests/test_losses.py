"""Loss math on hand-computable cases: expected values are written from the explicit formulas (log-sum-exp)."""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.core.losses import (
    infonce_loss, mae_loss, masked_infonce_loss, micl_loss, micl_similarity, nna_loss, nnclr_loss,
    patch_contrast_loss, patchify, symmetric_nnclr_loss, unpatchify,
)


def ce(logits_row: list[float], target: int) -> float:
    """Cross-entropy of one row, written out: −logit_target + log Σ exp(logit)."""
    return -logits_row[target] + math.log(sum(math.exp(v) for v in logits_row))


def close(value: torch.Tensor, expected: float, tol: float = 1e-6) -> bool:
    return abs(value.item() - expected) < tol


# ----------------------------------------------------------------------------------------------- NNCLR / NNA


def test_nnclr_two_by_two_by_hand():
    q = torch.tensor([[2.0, 0.0], [0.0, 5.0]])           # normalises to e1, e2
    p = torch.tensor([[3.0, 4.0], [0.0, 2.0]])           # normalises to (0.6, 0.8), (0, 1)
    tau = 0.5
    expected = (ce([0.6 / tau, 0.0], 0) + ce([0.8 / tau, 1.0 / tau], 1)) / 2
    assert close(nnclr_loss(q, p, tau), expected)


def test_nnclr_gathered_predictions_use_rank_offset():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])  # rank 0's and rank 1's predictions
    tau = 1.0
    # Row b of rank 1 is positive with column 2 + b.
    rows = [[1.0, 0.0, 0.6, -0.8], [0.0, 1.0, 0.8, 0.6]]
    expected_rank1 = (ce(rows[0], 2) + ce(rows[1], 3)) / 2
    expected_rank0 = (ce(rows[0], 0) + ce(rows[1], 1)) / 2
    assert close(nnclr_loss(q, p, tau, rank=1), expected_rank1)
    assert close(nnclr_loss(q, p, tau, rank=0), expected_rank0)
    # In a single process (rank 0) the default is the plain diagonal.
    assert close(nnclr_loss(q, p, tau), expected_rank0)


def test_nnclr_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="multiple"):
        nnclr_loss(torch.randn(2, 3), torch.randn(3, 3), 0.1)


def test_nnclr_gradient_reaches_only_prediction():
    q = torch.randn(4, 3, requires_grad=True)
    p = torch.randn(4, 3, requires_grad=True)
    nnclr_loss(q, p, 0.2).backward()
    assert q.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_symmetric_nnclr_pairs_each_neighbour_with_the_other_views_prediction():
    g = torch.Generator().manual_seed(0)
    nn0, nn1, p0, p1 = (torch.randn(3, 4, generator=g) for _ in range(4))
    tau = 0.3
    value = symmetric_nnclr_loss(nn0, nn1, p0, p1, tau)
    # Explicit formula from docs/methods.md (MAE-CT): ½[CE(nn1·p0ᵀ) + CE(nn0·p1ᵀ)].
    n = torch.nn.functional.normalize
    expected = 0.0
    for a, b in [(nn1, p0), (nn0, p1)]:
        logits = (n(a, dim=-1) @ n(b, dim=-1).T / tau).tolist()
        expected += sum(ce(row, i) for i, row in enumerate(logits)) / 3 / 2
    assert close(value, expected, 1e-5)
    # Swapping the roles of the two views leaves it unchanged; the same-view pairing would differ.
    assert torch.allclose(value, symmetric_nnclr_loss(nn1, nn0, p1, p0, tau))
    same_view = 0.5 * (nnclr_loss(nn0, p0, tau) + nnclr_loss(nn1, p1, tau))
    assert not torch.allclose(value, same_view)


def test_nna_two_by_two_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])           # anchors: e1, e2
    q = torch.tensor([[0.0, 2.0], [1.0, 0.0]])           # neighbours: e2, e1
    p = torch.tensor([[0.6, 0.8], [0.8, -0.6]])          # already unit norm
    tau = 0.5
    # Row 0: positive q0·p0 = 0.8, negative z0·p1 = 0.8.  Row 1: negative z1·p0 = 0.8, positive q1·p1 = 0.8.
    row0 = [0.8 / tau, 0.8 / tau]
    row1 = [0.8 / tau, 0.8 / tau]
    expected = (ce(row0, 0) + ce(row1, 1)) / 2
    assert close(nna_loss(z, q, p, tau), expected)
    # Plain NNCLR would use q for the negatives too: row 0 negative q0·p1 = -0.6, row 1 negative q1·p0 = 0.6.
    nnclr_expected = (ce([0.8 / tau, -0.6 / tau], 0) + ce([0.6 / tau, 0.8 / tau], 1)) / 2
    assert close(nnclr_loss(q, p, tau), nnclr_expected)
    assert not close(nna_loss(z, q, p, tau), nnclr_expected)


def test_nna_matches_elementwise_definition_with_gathered_predictions():
    g = torch.Generator().manual_seed(1)
    z, q = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    p = torch.randn(6, 5, generator=g)                   # two processes × 3 rows; we are rank 1
    tau = 0.2
    n = lambda v: (v / v.norm()).tolist()                # noqa: E731
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    expected = 0.0
    for b in range(3):
        row = [dot(n(z[b]), n(p[k])) / tau for k in range(6)]
        row[3 + b] = dot(n(q[b]), n(p[3 + b])) / tau
        expected += ce(row, 3 + b) / 3
    assert close(nna_loss(z, q, p, tau, rank=1), expected, 1e-5)


def test_nna_equals_nnclr_when_neighbour_is_the_anchor():
    g = torch.Generator().manual_seed(2)
    z, p = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.allclose(nna_loss(z, z, p, 0.1), nnclr_loss(z, p, 0.1))


def test_nna_gradient_reaches_only_prediction():
    z = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3, requires_grad=True)
    p = torch.randn(4, 3, requires_grad=True)
    nna_loss(z, q, p, 0.2).backward()
    assert z.grad is None and q.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- patch losses


def test_patch_contrast_single_masked_token_by_hand():
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])      # (1, 3, 2)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    masked = torch.tensor([[False, True, False]])
    tau = 0.1
    # s_1 = (0, 1): logits over the teacher patches of the same image are (0, 1, 0)/τ, target 1.
    assert close(patch_contrast_loss(student, teacher, masked, tau), ce([0.0, 10.0, 0.0], 1), 1e-5)


def test_patch_contrast_averages_over_masked_tokens_of_each_image_separately():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    masked = torch.tensor([[True, False, True, True], [False, True, False, False]])
    tau = 0.2
    n = torch.nn.functional.normalize
    s, t = n(student, dim=-1), n(teacher, dim=-1)
    losses = []
    for b in range(2):
        for i in range(4):
            if masked[b, i]:
                losses.append(ce((s[b, i] @ t[b].T / tau).tolist(), i))
    assert close(patch_contrast_loss(student, teacher, masked, tau), sum(losses) / len(losses), 1e-5)
    # No cross-image negatives: changing image 1's teacher features cannot change image 0's terms.
    only_image0 = masked.clone()
    only_image0[1] = False
    other = teacher.clone()
    other[1] = torch.randn(4, 3, generator=g)
    assert torch.allclose(patch_contrast_loss(student, teacher, only_image0, tau),
                          patch_contrast_loss(student, other, only_image0, tau))


def test_patch_contrast_teacher_gets_no_gradient():
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, requires_grad=True)
    masked = torch.tensor([[True, False, True, False], [False, True, False, True]])
    patch_contrast_loss(student, teacher, masked, 0.1).backward()
    assert teacher.grad is None and student.grad is not None
    # Unmasked student tokens are not queries, so they get no gradient.
    assert student.grad[~masked].abs().sum() == 0


def test_masked_infonce_by_hand_and_ignores_unmasked_positions():
    student = torch.tensor([[[1.0, 0.0], [9.0, 9.0]], [[7.0, -7.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[0.6, 0.8], [5.0, 5.0]], [[3.0, 3.0], [0.0, 2.0]]])
    masked = torch.tensor([[True, False], [False, True]])
    tau = 0.5
    # Masked rows: s = (1,0), (0,1); teacher at the same positions: (0.6,0.8), (0,1).
    expected = (ce([0.6 / tau, 0.0], 0) + ce([0.8 / tau, 1.0 / tau], 1)) / 2
    assert close(masked_infonce_loss(student, teacher, masked, tau), expected)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~masked] = 100.0
    teacher2[~masked] = -3.0
    assert close(masked_infonce_loss(student2, teacher2, masked, tau), expected)


def test_masked_losses_reject_empty_masks():
    x = torch.randn(1, 2, 3)
    empty = torch.zeros(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="no tokens"):
        masked_infonce_loss(x, x, empty, 0.1)
    with pytest.raises(ValueError, match="no tokens"):
        patch_contrast_loss(x, x, empty, 0.1)


def test_infonce_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    tau = 0.25
    r = 1 / math.sqrt(2)
    expected = (ce([0.0, r / tau], 0) + ce([r / tau, 1.0 / tau], 1)) / 2
    assert close(infonce_loss(a, b, tau), expected, 1e-5)


# ----------------------------------------------------------------------------------------------- MiCL


def test_micl_similarity_endpoints():
    tau, kappa = 0.07, 1 / 64
    c = torch.tensor([-1.0, 0.0, 1.0])
    s = micl_similarity(c, tau, kappa)
    assert torch.allclose(s, torch.tensor([0.0, 0.5 / (1 + kappa) / tau, 1.0 / tau]))
    assert torch.all(s.diff() > 0)


def test_micl_two_by_two_by_hand():
    m = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    tau, kappa = 0.5, 0.25
    s = lambda c: 0.5 * (1 + c) / (1 + kappa * (1 - c)) / tau  # noqa: E731
    cos = [[1.0, 0.6], [0.0, 0.8]]                              # m·nᵀ
    sim = [[s(c) for c in row] for row in cos]
    sim_t = [[sim[j][i] for j in range(2)] for i in range(2)]
    expected = 0.5 * ((ce(sim[0], 0) + ce(sim[1], 1)) / 2 + (ce(sim_t[0], 0) + ce(sim_t[1], 1)) / 2)
    assert close(micl_loss(m, n, tau, kappa), expected, 1e-5)


def test_micl_is_symmetric_in_its_views():
    g = torch.Generator().manual_seed(4)
    m, n = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.allclose(micl_loss(m, n), micl_loss(n, m))


# ----------------------------------------------------------------------------------------------- MAE


def test_mae_loss_norm_pix_uses_unbiased_variance():
    target = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 4.0, 10.0]]])    # (1, 2, 3)
    pred = torch.zeros(1, 2, 3)
    mask = torch.tensor([[1, 0]])
    eps = 1e-6
    # Patch 0: mean 2, unbiased variance ((−1)² + 0 + 1²) / 2 = 1 → target (−1, 0, 1)/sqrt(1 + eps).
    expected = (1 + 0 + 1) / 3 / (1 + eps)
    assert close(mae_loss(pred, target, mask, norm_pix=True, eps=eps), expected)
    # The biased variance (2/3) would give 1.0 instead.
    assert not close(mae_loss(pred, target, mask, norm_pix=True, eps=eps), 1.0, 1e-3)


def test_mae_loss_ignores_unmasked_patches():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float)
    base = mae_loss(pred, target, mask, norm_pix=False)
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(base, expected)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~mask.bool()] = 50.0
    target2[~mask.bool()] = -50.0
    assert torch.allclose(mae_loss(pred2, target2, mask, norm_pix=False), base)
    assert torch.allclose(mae_loss(pred2, target2, mask.bool()), mae_loss(pred, target, mask))


def test_patchify_order_is_p_p_c():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    # Patch 1 of image 0 covers rows 0-1, columns 2-3; element index = (row*p + col)*C + channel.
    for r in range(2):
        for c in range(2):
            for ch in range(3):
                assert patches[0, 1, (r * 2 + c) * 3 + ch] == images[0, ch, r, 2 + c]


def test_patchify_unpatchify_round_trip():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(unpatchify(patches, 4, grid_size=(2, 3)), images)
    square = torch.randn(1, 1, 8, 8)
    assert torch.equal(unpatchify(patchify(square, 2), 2), square)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 3, 7, 8), 2)
    with pytest.raises(ValueError, match="square"):
        unpatchify(patches, 4)
