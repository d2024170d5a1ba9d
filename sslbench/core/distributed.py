"""Process-group helpers: rank, world size and the all-gathers that contrastive losses and queues need.

Everything here degrades to the identity (rank 0, world size 1) when ``torch.distributed`` is not initialised,
so objectives are written once and run unchanged in a single CPU process or under ``accelerate launch``
(Accelerate initialises the default process group; we only read it).

Gradient convention
-------------------
:func:`gather_with_grad` returns the concatenation of every process's tensor. In the backward pass the gradient
with respect to the *whole* gathered tensor is summed over processes (``all_reduce``) and each process keeps the
slice that belongs to its own input. The local input therefore receives ``d(sum_r L_r) / d x_local``, the gradient of
the sum of all processes' losses. Data-parallel training (DDP / Accelerate) then *averages* parameter gradients over
the ``W`` processes, so the parameters see the gradient of ``(1/W) * sum_r L_r`` — which is exactly the loss of one
process on the global batch when every ``L_r`` is a mean over the same number of local rows. This is the
convention of SimCLR/MoCo v3 style gathers.

We implement it as our own :class:`torch.autograd.Function` (all_gather forward, all_reduce backward) instead of
``torch.distributed.nn.functional.all_gather`` because the latter emulates reduce-scatter with all-to-all on
backends without reduce-scatter (gloo); the all-reduce works on every backend, is easy to read, and its cost
(a ``W*B x D`` tensor, D = 256 for the heads) is negligible next to the backbone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main", "gather", "gather_with_grad", "all_reduce_with_grad"]


def is_distributed() -> bool:
    """True when a default process group exists and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and shows progress bars (rank 0)."""
    return rank() == 0


def _first_dim_sizes(x: torch.Tensor) -> list[int]:
    """The first-dimension size of ``x`` on every process (one tiny all_gather)."""
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, without gradient.

    Processes may hold different numbers of rows (e.g. the last batch of an epoch): rows are padded for the
    collective and trimmed afterwards, so the result has exactly ``sum_r len(x_r)`` rows in rank order.
    Returns ``x`` detached when not distributed.
    """
    if not is_distributed():
        return x.detach()
    x = x.detach().contiguous()
    sizes = _first_dim_sizes(x)
    longest = max(sizes)
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gathered gradient over processes and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        ctx.local_rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every process's loss may depend on our rows, so their gradients must be summed before slicing.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.local_rows
        return grad[start:start + ctx.local_rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all processes along dim 0, keeping the gradient for the local slice.

    Rows ``rank*B : (rank+1)*B`` of the result are this process's ``x``. All processes must pass the same ``B``
    (use ``drop_last=True`` for training loaders); see the module docstring for the gradient convention.
    Identity when not distributed.
    """
    if not is_distributed():
        return x
    sizes = _first_dim_sizes(x)
    if len(set(sizes)) != 1:
        raise ValueError(f"gather_with_grad needs the same batch size on every process, got {sizes}; "
                         "train with drop_last=True")
    return _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over processes; the backward of a sum-all-reduce is a sum-all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over processes, differentiably (used for synchronised BatchNorm statistics).

    Same gradient convention as :func:`gather_with_grad`. Identity when not distributed.
    """
    if not is_distributed():
        return x
    return _AllReduceWithGrad.apply(x)


def ignore_in_ddp(module, names: list[str]) -> None:
    """Keep buffers that every process holds identically (queues, EMA copies, teachers) out of
    DistributedDataParallel's per-step broadcast, through DDP's own ``_ddp_params_and_buffers_to_ignore``."""
    module._ddp_params_and_buffers_to_ignore = list(names)
