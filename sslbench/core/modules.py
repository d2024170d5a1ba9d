"""Building blocks shared by objectives: nearest-neighbour queue, head MLPs, synchronised BatchNorm, EMA teacher.

Every dimension is an argument, so tests build tiny heads and recipes build the papers' sizes.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.core import distributed
from sslbench.core.losses import fp32_einsum, unit_fp32

__all__ = ["NNQueue", "mlp", "GlobalBatchNorm1d", "convert_sync_batchnorm", "parameters_as_buffers", "EMA", "cosine_momentum"]


# --------------------------------------------------------------------------------------------------------------
# Nearest-neighbour queue


class NNQueue(nn.Module):
    """FIFO support set of past embeddings with their dataset ids, for NNCLR-style nearest-neighbour swaps.

    Used by MIM-Refiner (``normalize=False``: raw projector outputs are stored and returned) and MAE-CT
    (``normalize=True``: entries are stored L2-normalised). The state lives in buffers (``values``, ``ids``,
    ``labels``, ``ptr``, ``filled``) so it is saved in checkpoints and carried from one stage to the next. Nothing
    here takes part in autograd: inputs are detached and outputs never require grad.

    ``labels`` (−1 when unknown) serve one diagnostic only: how often the retrieved neighbour has the query's class
    (``lookup(..., return_labels=True)``). The lookup itself never reads them.

    >>> queue = NNQueue(size=4, dim=2, normalize=False)
    >>> queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([10, 11]))
    >>> queue.lookup(torch.tensor([[0.1, 1.0]]), torch.tensor([99]))
    tensor([[0., 2.]])
    """

    values: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, normalize: bool):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.normalize = normalize
        self.register_buffer("values", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))       # next slot to overwrite
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))    # slots holding real entries

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, normalize={self.normalize}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the queue kept labels resume with unknown labels (the lookups are unchanged).
        state_dict.setdefault(prefix + "labels", torch.full_like(self.labels, -1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def lookup(self, x: torch.Tensor, ids: torch.Tensor | None = None, topk: int = 1,
               generator: torch.Generator | None = None, uniform: torch.Tensor | None = None,
               return_labels: bool = False):
        """Return the stored neighbour ``(len(x), dim)`` of each row of ``x``.

        Similarity is the cosine between ``norm(x)`` and the normalised filled entries; an entry whose stored id
        equals the row's id gets similarity −1 (never retrieve the sample itself, which happens across epoch
        boundaries and on small datasets). ``topk=1`` takes the best entry, ``topk>1`` picks uniformly at random
        among the ``topk`` best: from ``uniform`` when given (one number in [0, 1) per row — per-sample keyed
        numbers make N processes pick what one process picks), else from ``generator``. ``ids`` may have ``len(x) / V`` entries
        when ``x`` stacks V views of the same batch. An empty queue returns ``x`` itself (detached, normalised if
        ``normalize``), i.e. the very first step degenerates to a plain contrastive step. ``return_labels=True``
        also returns the stored labels of the chosen entries, ``(len(x),)`` (−1 for an empty queue).
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        x = x.detach()
        filled = int(self.filled)
        if filled == 0:
            out = F.normalize(x, dim=-1) if self.normalize else x.clone()
            return (out, torch.full((len(x),), -1, dtype=torch.long, device=x.device)) if return_labels else out
        # The ring buffer fills slots 0..size-1 in order, so the filled entries are always the first `filled`.
        stored = self.values[:filled]
        # fp32 with autocast off: under bf16 autocast the matmul would round the cosines to ~3 digits and pick
        # neighbours among near-ties at random (the NN choice is as much part of the loss as its logits)
        similarity = fp32_einsum("qd,kd->qk", unit_fp32(x), unit_fp32(stored))
        if ids is not None:
            if len(x) % len(ids):
                raise ValueError(f"{len(x)} query rows do not match {len(ids)} ids")
            row_ids = ids.to(self.ids.device).repeat(len(x) // len(ids))
            is_self = row_ids[:, None] == self.ids[None, :filled]
            similarity = similarity.masked_fill(is_self, -1.0)
        k = min(topk, filled)
        best = similarity.topk(k, dim=1).indices                         # (rows, k)
        if k == 1:
            choice = best[:, 0]
        else:
            if uniform is not None:
                pick = (uniform.reshape(-1, 1).to(best.device) * k).long().clamp_max(k - 1)
            else:
                device = generator.device if generator is not None else best.device
                pick = torch.randint(k, (len(best), 1), generator=generator, device=device).to(best.device)
            choice = best.gather(1, pick).squeeze(1)
        if return_labels:
            return stored[choice].to(x.dtype), self.labels[choice]
        return stored[choice].to(x.dtype)

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """Append rows of ``x`` (the gathered view-0 vectors) with their dataset ids, overwriting the oldest.

        ``ids=None`` stores −1 (no self-exclusion possible for those entries), and so does ``labels=None``. If more
        rows than ``size`` arrive at once, only the newest ``size`` are kept.
        """
        x = x.detach().to(self.values.dtype)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(x.shape)}")
        if ids is None:
            ids = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        if labels is None:
            labels = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        if len(ids) != len(x) or len(labels) != len(x):
            raise ValueError(f"{len(x)} rows but {len(ids)} ids and {len(labels)} labels")
        if self.normalize:
            x = F.normalize(x, dim=-1)
        arriving = len(x)
        x, ids, labels = x[-self.size:], ids[-self.size:].to(self.ids.dtype), labels[-self.size:].to(self.labels.dtype)
        # Place the kept rows where writing all arriving rows one by one would have left them.
        start = (int(self.ptr) + arriving - len(x)) % self.size
        slots = (start + torch.arange(len(x), device=self.values.device)) % self.size
        self.values[slots] = x.to(self.values.device)
        self.ids[slots] = ids.to(self.ids.device)
        self.labels[slots] = labels.to(self.labels.device)
        self.ptr.fill_((int(self.ptr) + arriving) % self.size)
        self.filled.fill_(min(int(self.filled) + arriving, self.size))


# --------------------------------------------------------------------------------------------------------------
# Head MLPs


def mlp(dims: Sequence[int], act: Callable[[], nn.Module] = nn.GELU, bias: bool | None = None,
        batchnorm: bool = True, last_bn: bool = True, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] → dims[1] → … → dims[-1]``, hidden ones followed by BatchNorm (optional) and ``act``.

    ``bias=None`` gives a Linear a bias only when no BatchNorm follows it — a bias right before BN is cancelled
    by the mean subtraction (BN's shift plays its role), which is also what the official MIM-Refiner / MAE-CT
    heads do. ``last_bn`` appends a BatchNorm after the last Linear (``last_bn_affine=False`` for ConMIM).
    Linear weights are Xavier-uniform, biases zero.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least input and output dims, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        is_last = i == len(dims) - 2
        bn_follows = last_bn if is_last else batchnorm
        linear = nn.Linear(d_in, d_out, bias=(not bn_follows) if bias is None else bias)
        nn.init.xavier_uniform_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if bn_follows:
            layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine if is_last else True))
        if not is_last:
            layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------------------
# Synchronised BatchNorm


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are computed over the global batch of all processes.

    ``torch.nn.SyncBatchNorm`` only runs on GPUs; this version uses two differentiable all-reduces (sum, then
    sum of squared deviations) and therefore works on every backend, including gloo on CPU — so a 2-process CPU
    run gives the same heads as one process with the global batch. In evaluation mode, or in a single process,
    it is exactly ``nn.BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.ndim)]                          # (B, C) or (B, C, L): statistics per channel C
        shape = [1, -1] + [1] * (x.ndim - 2)
        local_count = x.numel() // x.shape[1]
        out_dtype = x.dtype
        x = x.float()                                          # bf16 cannot even count rows exactly beyond 256
        totals = distributed.all_reduce_with_grad(torch.cat([x.sum(dims), x.new_tensor([local_count])]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        # Two passes (mean first) instead of E[x²] − mean², which loses precision for large activations.
        var = distributed.all_reduce_with_grad((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            # detached before the host read: converting a tensor that requires grad warns on every step
            self._update_running_stats(mean.detach(), var.detach(), count.detach().item())
        return out.to(out_dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, biased_var: torch.Tensor, count: float) -> None:
        assert self.num_batches_tracked is not None and self.running_mean is not None
        assert self.running_var is not None
        self.num_batches_tracked.add_(1)
        # Same rule as nn.BatchNorm: cumulative average when momentum is None, unbiased variance in running_var.
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = biased_var * count / max(count - 1.0, 1.0)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` by :class:`GlobalBatchNorm1d`, keeping its parameters and buffers.

    Call it when distributed (MIM-Refiner heads use SyncBN); the converted layers behave like the originals in a
    single process, so converting unconditionally is also safe. Returns the (possibly new) module.
    """
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        converted = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        reference = next(itertools.chain(module.parameters(), module.buffers()), None)
        return converted if reference is None else converted.to(reference.device)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module


# --------------------------------------------------------------------------------------------------------------
# EMA teacher


def parameters_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` (in place) into a buffer of the same name holding a detached copy.

    A teacher stored this way is saved in checkpoints and moves with ``.to()``, but is not among its owner's
    parameters: the optimiser, the parameter groups (which switch ``requires_grad`` back on for everything not
    frozen) and DDP's gradient synchronisation never see it.
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return module


class EMA(nn.Module):
    """An exponential-moving-average copy of a module: ``θ_t ← m·θ_t + (1 − m)·θ_s`` after each step.

    The copy holds the student's parameters as buffers (:func:`parameters_as_buffers`), so it never requires
    grad, and its forward runs without autograd. ``copy_buffers=True`` copies the student's own buffers (BatchNorm
    running statistics) at each update; ConMIM keeps ``copy_buffers=False``, so its teacher's BN statistics come
    from its own forward passes (MoCo v3 convention). The train/eval mode of the copy is left to the caller
    (ConMIM keeps its teacher in train mode).
    """

    def __init__(self, module: nn.Module, momentum: float, copy_buffers: bool = True):
        super().__init__()
        self.param_names = [name for name, _ in module.named_parameters()]
        self.module = parameters_as_buffers(copy.deepcopy(module))
        self.momentum = momentum
        self.copy_buffers = copy_buffers

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """Move the copy towards ``student`` (same architecture, unwrapped from DDP) with ``momentum`` (default: the one given at construction)."""
        m = self.momentum if momentum is None else momentum
        teacher = dict(self.module.named_buffers())
        student_params = dict(student.named_parameters())
        if set(self.param_names) != student_params.keys():
            missing = sorted(set(self.param_names) ^ student_params.keys())[:3]
            raise ValueError(f"EMA teacher and student parameters differ (e.g. {missing})")
        for name in self.param_names:
            # lerp_(s, 1 − m) = t + (1 − m)(s − t) = m·t + (1 − m)·s
            teacher[name].lerp_(student_params[name].detach().to(teacher[name].dtype), 1.0 - m)
        if self.copy_buffers:
            for name, buffer in student.named_buffers():
                teacher[name].copy_(buffer)


def cosine_momentum(step: int, total: int, base: float, final: float = 1.0) -> float:
    """BYOL/ConMIM momentum schedule: ``final − (final − base)·(cos(π·step/total) + 1)/2``, base at 0, final at total."""
    if total <= 0:
        return final
    progress = min(max(step / total, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
