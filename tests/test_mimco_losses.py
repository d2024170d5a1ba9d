"""MimCo-style losses (sslbench.core.losses.mimco_image_loss / mimco_patch_loss): their math on cases computed by
hand, the stop-gradient on the teacher, the gathered (multi-process) layout, and fp32 logits under bf16 autocast.
(A file of its own beside tests/test_losses.py, which another change edits at the same time.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.core.losses import mimco_image_loss, mimco_patch_loss

E = math.e


def test_image_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mimco_image_loss(s, s, 1.0).item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)
    # both students point at teacher 0; τ 0.5 doubles the logits: rows [2, 0] with targets 0 and 1
    s = torch.tensor([[3.0, 0.0], [1.0, 0.0]])                 # not unit length: normalised inside
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    expected = (math.log(1 + E ** -2) + math.log(1 + E ** 2)) / 2
    assert mimco_image_loss(s, t, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_image_loss_with_gathered_teacher_takes_the_positive_at_rank_offset():
    s = torch.tensor([[0.0, 1.0]])
    gathered = torch.tensor([[1.0, 0.0], [0.0, 1.0]])          # rank 0's row, then ours (rank 1)
    assert mimco_image_loss(s, gathered, 1.0, rank=1).item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)
    assert mimco_image_loss(s, gathered, 1.0, rank=0).item() == pytest.approx(math.log(1 + E), abs=1e-6)


def _case():
    """Two images of two patches; image 0 masks patch 0 only, image 1 both. The visible teacher patch of image 0
    ([5, 5]) would be the best match of the first query if it were (wrongly) used as a key."""
    student = torch.tensor([[[1.0, 0.0], [7.0, 7.0]],
                            [[0.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[1.0, 0.0], [5.0, 5.0]],
                            [[0.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    masked = torch.tensor([[True, False], [True, True]])
    return student, teacher, masked


def test_patch_loss_with_batch_negatives_by_hand():
    student, teacher, masked = _case()
    # queries and keys in mask order: [1,0], [0,1], [1,0] → logits [[1,0,1],[0,1,0],[1,0,1]], targets 0, 1, 2
    expected = (2 * math.log(1 + 2 * E) + math.log(2 + E)) / 3 - 1
    loss = mimco_patch_loss(student, teacher, masked, 1.0, "batch")
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert teacher.grad is None, "the teacher side must be detached"
    assert student.grad[0, 1].abs().sum() == 0, "a visible position is no query"


def test_patch_loss_with_image_negatives_by_hand():
    student, teacher, masked = _case()
    # image 0: one masked key → a certain pick, loss 0; image 1: logits [1, 0] and [0, 1], each log(1 + 1/e)
    expected = 2 * math.log(1 + 1 / E) / 3
    assert mimco_patch_loss(student, teacher, masked, 1.0, "image").item() == pytest.approx(expected, abs=1e-6)


def test_patch_loss_with_gathered_keys_equals_the_explicit_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    masked = torch.zeros(2, 5, dtype=torch.bool)
    masked[:, [1, 3]] = True
    other = torch.randn(4, 4)                          # the lower ranks' four masked teacher features
    keys = torch.cat([other, teacher[masked]])
    loss = mimco_patch_loss(student, teacher, masked, 0.2, keys=keys, key_offset=4)
    logits = F.normalize(student[masked], dim=-1) @ F.normalize(keys, dim=-1).T / 0.2
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.arange(4, 8)).item(), abs=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        mimco_patch_loss(student, teacher, masked, 0.2, keys=keys, key_offset=5)
    with pytest.raises(ValueError, match="no gathered keys"):
        mimco_patch_loss(student, teacher, masked, 0.2, "image", keys=keys)
    with pytest.raises(ValueError, match="no tokens"):
        mimco_patch_loss(student, teacher, torch.zeros_like(masked), 0.2)


@pytest.mark.parametrize("negatives", ["batch", "image"])
def test_logits_are_fp32_under_bf16_autocast(negatives):
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 9, 16) * 3, torch.randn(4, 9, 16) * 3
    masked = torch.rand(4, 9) < 0.6
    masked[:, 0] = True
    cls_s, cls_t = torch.randn(8, 16), torch.randn(8, 16)
    plain = (mimco_patch_loss(student, teacher, masked, 0.2, negatives), mimco_image_loss(cls_s, cls_t, 0.2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = (mimco_patch_loss(student, teacher, masked, 0.2, negatives), mimco_image_loss(cls_s, cls_t, 0.2))
    for a, b in zip(auto, plain):
        assert a.dtype == torch.float32 and abs(a.item() - b.item()) < 1e-6
