"""Contrastive logits are float32 whatever the autocast dtype (issue 16, item 6).

For float32 inputs every contrastive loss gives the same value under ``torch.autocast("cpu", bfloat16)`` as
without it. The inputs are chosen so that bf16 similarities would move the loss by far more than the tolerance:
the "bf16 reference" below recomputes the losses with their products rounded to bf16 (what autocast did before
the change): its logits move by more than 1e-3 and its loss by more than ten times the tolerance, so the equality
test cannot pass by accident. (Measured on the code before the change: every loss moved by 5e-6 to 5e-3.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslbench.core.losses import (
    fp32_einsum,
    infonce_loss,
    masked_infonce_loss,
    micl_loss,
    micl_similarity,
    nna_loss,
    nnclr_loss,
    patch_contrast_loss,
    symmetric_nnclr_loss,
    unit_fp32,
)

TAU = 0.1


def features(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


B, N, D = 8, 16, 64
A, P, Q, Z = (features(B, D, seed=s) for s in range(4))
S, T = features(2, N, D, seed=4), features(2, N, D, seed=5)
MASKED = torch.rand(2, N, generator=torch.Generator().manual_seed(6)) < 0.6

LOSSES = {
    "nnclr": lambda: nnclr_loss(Q, P, TAU),
    "symmetric_nnclr": lambda: symmetric_nnclr_loss(Q, Z, P, A, TAU),
    "nna": lambda: nna_loss(Z, Q, P, TAU),
    "infonce": lambda: infonce_loss(A, P, TAU),
    "patch_contrast": lambda: patch_contrast_loss(S, T, MASKED, TAU),
    "masked_infonce": lambda: masked_infonce_loss(S, T, MASKED, TAU),
    "micl": lambda: micl_loss(A, P, TAU),
}


def bf16_products(x: torch.Tensor, y: torch.Tensor, equation: str = "id,jd->ij") -> torch.Tensor:
    """What a matmul under bf16 autocast computes: operands rounded to bf16, result in bf16."""
    return torch.einsum(equation, x.bfloat16(), y.bfloat16()).float()


def ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(len(logits)))


# The losses' math with bf16 similarities, for the can-fail check (local batches: the positive is the diagonal).
BF16_REFERENCE = {
    "nnclr": lambda: ce(bf16_products(F.normalize(Q, dim=-1), F.normalize(P, dim=-1)) / TAU),
    "infonce": lambda: ce(bf16_products(F.normalize(A, dim=-1), F.normalize(P, dim=-1)) / TAU),
    "micl": lambda: 0.5 * (ce(micl_similarity(bf16_products(F.normalize(A, dim=-1), F.normalize(P, dim=-1)), TAU))
                           + ce(micl_similarity(bf16_products(F.normalize(P, dim=-1), F.normalize(A, dim=-1)), TAU))),
    "patch_contrast": lambda: F.cross_entropy(
        bf16_products(F.normalize(S, dim=-1), F.normalize(T, dim=-1), "bid,bjd->bij")[MASKED] / TAU,
        torch.arange(N).expand(2, N)[MASKED]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_the_same_with_and_without_bf16_autocast(name):
    plain = LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name]()
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - plain.item()) < 1e-6


@pytest.mark.parametrize("name", sorted(BF16_REFERENCE))
def test_bf16_similarities_would_move_the_loss_by_more_than_the_tolerance(name):
    # the precision test above would fail if the products were left to autocast
    assert abs(BF16_REFERENCE[name]().item() - LOSSES[name]().item()) > 1e-5


def test_bf16_logits_are_off_by_more_than_1e_3():
    a, p = F.normalize(A, dim=-1), F.normalize(P, dim=-1)
    exact = fp32_einsum("id,jd->ij", a, p) / TAU
    assert (bf16_products(a, p) / TAU - exact).abs().max() > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = fp32_einsum("id,jd->ij", a, p) / TAU
    assert guarded.dtype == torch.float32 and torch.equal(guarded, exact)


def test_gradients_under_autocast_match_fp32():
    p = P.clone().requires_grad_(True)
    infonce_loss(A, p, TAU).backward()
    expected = p.grad.clone()
    p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = infonce_loss(A, p, TAU)
    loss.backward()
    torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-6)


def test_fp32_einsum_keeps_float32_under_autocast_and_accepts_bf16_inputs():
    x, y = features(3, 5, seed=7), features(4, 5, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_einsum("id,jd->ij", x, y)
        low = fp32_einsum("id,jd->ij", x.bfloat16(), y.bfloat16())       # bf16 activations are upcast first
        assert (x @ y.T).dtype == torch.bfloat16                          # what autocast does without the guard
    assert out.dtype == low.dtype == torch.float32
    torch.testing.assert_close(out, x @ y.T, rtol=0, atol=1e-6)
    assert unit_fp32(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(unit_fp32(x).norm(dim=-1), torch.ones(3))
