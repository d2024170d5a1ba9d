"""The loss math of every objective, as small pure functions on tensors.

All functions take *un-normalised* features, L2-normalise inside where the method does, and return the mean
cross-entropy (or MSE) as a scalar tensor. Stop-gradients that belong to a method (the nearest neighbour and
anchor of NNCLR/NNA, the teacher of ConMIM/MimCo) are applied inside, so a caller cannot forget them.

Gathered predictions
--------------------
The NN losses accept ``prediction`` either local ``(B, D)`` or gathered over processes ``(W*B, D)``
(see :func:`sslbench.core.distributed.gather_with_grad`) while the query rows (neighbour / anchor) stay local
``(B, D)``. Row ``b`` of this process is then positive with column ``rank*B + b``. ``rank`` defaults to this
process's rank and can be passed explicitly (tests, or callers that gather on a sub-group).

Precision
---------
Every contrastive logit is computed in float32 whatever the autocast dtype: the features are cast to float32
before they are normalised and the similarity product runs with autocast disabled (:func:`unit_fp32`,
:func:`fp32_einsum`). Under bf16 autocast a logit near 1/τ = 10 would otherwise be rounded to steps of 0.0625
(8 bits of mantissa), which is noise of the size of the differences the softmax is asked to learn.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sslbench.core import distributed

__all__ = [
    "nnclr_loss", "symmetric_nnclr_loss", "nna_loss", "patch_contrast_loss", "masked_infonce_loss",
    "infonce_loss", "micl_similarity", "micl_loss", "mae_loss", "patchify", "unpatchify", "unit_fp32", "fp32_einsum",
]


def unit_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` L2-normalised along the last dimension, in float32 (cast first: a bf16 norm is itself imprecise).

    The cast is differentiable, so a bf16 activation gets its gradient back in bf16.
    """
    return F.normalize(x.float(), dim=-1)


def fp32_einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` on float32 copies of ``operands`` with autocast disabled for this one op.

    Autocast would cast float32 inputs of a matmul down to its lower precision dtype; turning it off here keeps
    the similarities — and so every logit built from them — in float32 whatever the run's mixed precision.
    """
    operands = tuple(o.float() for o in operands)
    device_type = operands[0].device.type
    # devices without autocast (e.g. "meta") have nothing to disable
    guard = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
             else contextlib.nullcontext())
    with guard:
        return torch.einsum(equation, *operands)


def _positive_columns(local_rows: int, columns: int, rank: int | None, device: torch.device) -> torch.Tensor:
    """Column index of each local row's positive: ``offset + b`` with offset 0 (local) or ``rank*B`` (gathered)."""
    if columns == local_rows:
        offset = 0
    elif columns % local_rows == 0:
        offset = (distributed.rank() if rank is None else rank) * local_rows
        if offset + local_rows > columns:
            raise ValueError(f"rank {offset // local_rows} is outside the {columns // local_rows} gathered batches")
    else:
        raise ValueError(f"the candidate set has {columns} rows, expected {local_rows} (local) or a multiple of it "
                         "(gathered over processes)")
    return torch.arange(offset, offset + local_rows, device=device)


def nnclr_loss(neighbour: torch.Tensor, prediction: torch.Tensor, temperature: float,
               rank: int | None = None) -> torch.Tensor:
    """NNCLR loss (Dwibedi et al. 2021): the nearest neighbour of view i must pick out the prediction of view j.

    ``logits = norm(neighbour) @ norm(prediction).T / temperature``, ``(B, W*B)``; target of row b is
    ``rank*B + b``. The neighbour (a queue entry) is detached, so only the prediction receives gradient.

    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(nnclr_loss(q, q, 1.0).item(), 4)   # log(1 + e^-1)
    0.3133
    """
    q = unit_fp32(neighbour.detach())
    p = unit_fp32(prediction)
    logits = fp32_einsum("id,jd->ij", q, p) / temperature
    return F.cross_entropy(logits, _positive_columns(len(q), len(p), rank, logits.device))


def symmetric_nnclr_loss(nn0: torch.Tensor, nn1: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor,
                         temperature: float, rank: int | None = None) -> torch.Tensor:
    """MAE-CT's symmetric NNCLR loss (Lehner et al. 2023): ``½[nnclr(nn1, p0) + nnclr(nn0, p1)]``.

    The neighbour of one view is paired with the prediction of the *other* view (docs/methods.md, MAE-CT).
    """
    return 0.5 * (nnclr_loss(nn1, p0, temperature, rank) + nnclr_loss(nn0, p1, temperature, rank))


def nna_loss(anchor: torch.Tensor, neighbour: torch.Tensor, prediction: torch.Tensor, temperature: float,
             rank: int | None = None) -> torch.Tensor:
    """MIM-Refiner's nearest-neighbour alignment (Alkin et al. 2024, arXiv 2402.10093).

    Like NNCLR, but only the positive uses the neighbour; the negatives use the anchor's own, un-swapped vector:
    ``logits[b, b'] = norm(neighbour_b)·norm(prediction_b')/τ`` for the positive column ``b' = rank*B + b`` and
    ``norm(anchor_b)·norm(prediction_k)/τ`` for every other column k. Anchor and neighbour are detached.
    """
    z = unit_fp32(anchor.detach())
    q = unit_fp32(neighbour.detach())
    p = unit_fp32(prediction)
    target = _positive_columns(len(z), len(p), rank, p.device)
    negatives = fp32_einsum("id,jd->ij", z, p)
    positives = fp32_einsum("id,id->i", q, p[target])
    is_positive = F.one_hot(target, num_classes=len(p)).bool()
    logits = torch.where(is_positive, positives[:, None], negatives) / temperature
    return F.cross_entropy(logits, target)


def _require_masked(masked: torch.Tensor) -> torch.Tensor:
    masked = masked.bool()
    if not masked.any():
        # A mean over zero tokens is NaN; fail loudly instead of silently training on nothing.
        raise ValueError("the mask selects no tokens; a masked-token loss needs at least one masked position")
    return masked


def patch_contrast_loss(student: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """ConMIM's intra-image inter-patch contrast (Yi et al., ICLR 2023, arXiv 2205.09616).

    ``student``/``teacher`` are ``(B, N, D)`` patch features, ``masked`` ``(B, N)`` bool. For each masked position
    i of image b the logits run over the patches j of the *same* image, ``norm(s_bi)·sg(norm(t_bj))/τ``, and the
    target is j = i. Cross-entropy averaged over all masked tokens of the batch; no cross-image negatives.
    """
    masked = _require_masked(masked)
    s = unit_fp32(student)
    t = unit_fp32(teacher.detach())
    logits = fp32_einsum("bid,bjd->bij", s, t) / temperature           # (B, N, N): query patch i, key patch j
    positions = torch.arange(student.shape[1], device=student.device).expand_as(masked)
    return F.cross_entropy(logits[masked], positions[masked])


def infonce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float, rank: int | None = None) -> torch.Tensor:
    """Image-level InfoNCE: row i of ``a`` must pick out row i of ``b`` among all rows of ``b``.

    ``logits = norm(a) @ norm(b).T / τ``; ``b`` may be gathered over processes (see module docstring).
    Neither side is detached — detach a teacher before calling.
    """
    a = unit_fp32(a)
    b = unit_fp32(b)
    logits = fp32_einsum("id,jd->ij", a, b) / temperature
    return F.cross_entropy(logits, _positive_columns(len(a), len(b), rank, logits.device))


def masked_infonce_loss(student: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """MimCo-style patch loss (Zhou et al., ACM MM 2022, arXiv 2209.03063; details unverified, see docs/methods.md).

    The student's prediction at each masked position must match the (detached) teacher feature at the same
    position; the negatives are the teacher features at all other masked positions of the batch, across images.
    """
    masked = _require_masked(masked)
    return infonce_loss(student[masked], teacher.detach()[masked], temperature, rank=0)


def micl_similarity(cosine: torch.Tensor, temperature: float = 0.07, kappa: float = 1 / 64) -> torch.Tensor:
    """MiCL's similarity (Yang & Xu, arXiv 2411.09858): ``s(c) = 0.5(1+c) / (1 + κ(1−c)) / τ``.

    Maps cosine c ∈ [-1, 1] monotonically to [0, 1/τ]; κ bends the curve so that hard negatives near c = 1
    are separated more sharply than with the plain cosine.
    """
    return 0.5 * (1 + cosine) / (1 + kappa * (1 - cosine)) / temperature


def micl_loss(m: torch.Tensor, n: torch.Tensor, temperature: float = 0.07, kappa: float = 1 / 64) -> torch.Tensor:
    """MiCL loss: ``½[CE(s(m·nᵀ), diag) + CE(s(n·mᵀ), diag)]`` on L2-normalised m, n; local-batch negatives."""
    cosine = fp32_einsum("id,jd->ij", unit_fp32(m), unit_fp32(n))
    logits = micl_similarity(cosine, temperature, kappa)
    target = torch.arange(len(m), device=m.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` images to ``(B, N, p*p*C)`` patches, row-major over the grid, pixels in MAE's (p, p, C) order."""
    batch, channels, height, width = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
    h, w = height // p, width // p
    x = images.reshape(batch, channels, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(batch, h * w, p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C)`` to ``(B, C, H, W)``; the grid is square unless given."""
    batch, count, width = patches.shape
    p = patch_size
    if width % (p * p):
        raise ValueError(f"patch width {width} is not a multiple of patch_size² = {p * p}")
    channels = width // (p * p)
    if grid_size is None:
        side = int(round(count ** 0.5))
        if side * side != count:
            raise ValueError(f"{count} patches do not form a square grid; pass grid_size")
        grid_size = (side, side)
    h, w = grid_size
    if h * w != count:
        raise ValueError(f"grid {h}x{w} does not hold {count} patches")
    x = patches.reshape(batch, h, w, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(batch, channels, h * p, w * p)


def mae_loss(pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE reconstruction loss (He et al. 2021): per-patch MSE, averaged over the masked patches only.

    ``pred`` and ``target_patches`` are ``(B, N, p*p*C)``; ``mask`` ``(B, N)`` is 1/True where a patch was removed.
    With ``norm_pix`` every target patch is standardised by its own mean and variance, ``(t − μ)/sqrt(σ² + eps)``.
    Like the official MAE code (``target.var(dim=-1)``) the variance is the *unbiased* one (divides by P − 1).
    """
    mask = _require_masked(mask).to(pred.dtype)
    target = target_patches
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)              # unbiased, as in the official implementation
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# --- MimCo-style (Zhou et al., ACM MM 2022, arXiv 2209.03063) ------------------------------------------------------
# Logits in fp32 whatever the autocast dtype (unit_fp32, fp32_einsum), as every contrastive loss here.


def _fp32_infonce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """``CE(norm(q) @ norm(k).T / τ, targets)`` with fp32 logits; gradients flow to both sides."""
    return F.cross_entropy(fp32_einsum("qd,kd->qk", unit_fp32(queries), unit_fp32(keys)) / temperature, targets)


def mimco_image_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     rank: int | None = None) -> torch.Tensor:
    """MimCo's image-level loss: InfoNCE of the student's projected CLS ``(B, D)`` against the (detached) teacher
    CLS; row b's positive is teacher row b (``rank*B + b`` when ``teacher`` is gathered over processes,
    ``(W*B, D)``), the other teacher rows are its negatives. fp32 logits.

    >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(mimco_image_loss(s, s, 1.0).item(), 4)   # log(1 + e^-1)
    0.3133
    """
    targets = _positive_columns(len(student), len(teacher), rank, student.device)
    return _fp32_infonce(student, teacher.detach(), targets, temperature)


def mimco_patch_loss(student: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor, temperature: float,
                     negatives: str = "batch", keys: torch.Tensor | None = None,
                     key_offset: int = 0) -> torch.Tensor:
    """MimCo's patch-level loss: the student's prediction at each masked position must pick out the (detached)
    teacher feature at the same position. ``student`` ``(B, N, D)``, ``teacher`` ``(B, N, D)``, ``masked``
    ``(B, N)`` bool. fp32 logits, mean over the masked positions.

    ``negatives="batch"``: the keys are the teacher features at every masked position of the batch, in the order of
    ``teacher[masked]``; ``keys`` may give them gathered over processes (all processes' ``teacher[masked]`` rows,
    in rank order), with this process's rows starting at ``key_offset`` (the masked positions of the lower ranks:
    masks may mask different numbers of patches). ``negatives="image"``: the keys of a query are the teacher
    features at the masked positions of its own image.
    """
    masked = _require_masked(masked)
    if negatives == "image":
        if keys is not None:
            raise ValueError("negatives='image' takes no gathered keys")
        logits = fp32_einsum("bid,bjd->bij", unit_fp32(student), unit_fp32(teacher.detach())) / temperature
        logits = logits.masked_fill(~masked[:, None, :], float("-inf"))      # visible positions are no keys
        positions = torch.arange(student.shape[1], device=student.device).expand_as(masked)
        return F.cross_entropy(logits[masked], positions[masked])
    if negatives != "batch":
        raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
    queries = student[masked]
    keys = teacher[masked] if keys is None else keys
    if not 0 <= key_offset <= len(keys) - len(queries):
        raise ValueError(f"{len(queries)} queries from key {key_offset} do not fit the {len(keys)} keys")
    targets = torch.arange(key_offset, key_offset + len(queries), device=student.device)
    return _fp32_infonce(queries, keys.detach(), targets, temperature)


__all__ += ["mimco_image_loss", "mimco_patch_loss"]
