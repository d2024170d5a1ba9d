"""Process-group helpers, checked in one process and with two real gloo CPU processes.

The two-process test compares every distributed computation with the same computation done by one process on the
global batch: gathered values, loss, parameter gradients (after DDP-style averaging) and synchronised BatchNorm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslbench.core import distributed
from sslbench.core.losses import infonce_loss, nna_loss, nnclr_loss
from sslbench.core.modules import convert_sync_batchnorm, mlp

WORLD = 2
ATOL = 1e-6


def test_single_process_is_the_identity():
    assert not dist.is_initialized()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    gathered = distributed.gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert distributed.all_reduce_with_grad(x) is x


# ----------------------------------------------------------------------------------------------- two processes


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _average_grads(grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """What DDP does to parameter gradients: all-reduce and divide by the world size."""
    out = []
    for g in grads:
        g = g.clone()
        dist.all_reduce(g)
        out.append(g / WORLD)
    return out


def _check_helpers_and_gather(rank: int) -> None:
    assert distributed.rank() == rank and distributed.world_size() == WORLD
    assert distributed.is_main() == (rank == 0)
    x = torch.full((2, 3), float(rank))
    assert torch.equal(distributed.gather(x), torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
    # Unequal row counts (last batch of an epoch): exactly the rows, in rank order.
    uneven = torch.arange(1 + 2 * rank, dtype=torch.float) + 10 * rank
    assert distributed.gather(uneven).tolist() == [0.0, 10.0, 11.0, 12.0]
    with_grad = distributed.gather_with_grad(torch.full((2, 3), float(rank), requires_grad=True))
    assert torch.equal(with_grad, distributed.gather(x)) and with_grad.requires_grad
    try:
        distributed.gather_with_grad(torch.zeros(1 + rank, 3))
    except ValueError as error:
        assert "drop_last" in str(error)
    else:
        raise AssertionError("unequal batch sizes must be rejected")


def _check_loss_gradients(rank: int) -> None:
    """Gradient of a loss on gathered predictions == single-process gradient on the global batch."""
    torch.manual_seed(0)                                   # identical model and data on both ranks
    model = torch.nn.Linear(5, 4)
    local = 3
    x, q, z = torch.randn(WORLD * local, 5), torch.randn(WORLD * local, 4), torch.randn(WORLD * local, 4)
    mine = slice(rank * local, (rank + 1) * local)
    tau = 0.2
    losses = {
        "nnclr": lambda q_, z_, p_: nnclr_loss(q_, p_, tau),
        "nna": lambda q_, z_, p_: nna_loss(z_, q_, p_, tau),
        "infonce": lambda q_, z_, p_: infonce_loss(q_, p_, tau),
    }
    for name, loss_fn in losses.items():
        reference = loss_fn(q, z, model(x))
        reference_grads = torch.autograd.grad(reference, list(model.parameters()))

        x_local = x[mine].clone().requires_grad_(True)
        predictions = distributed.gather_with_grad(model(x_local))
        assert _max_diff(predictions, model(x)) < ATOL
        loss = loss_fn(q[mine], z[mine], predictions)
        grads = torch.autograd.grad(loss, [*model.parameters(), x_local])

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert abs(mean_loss.item() / WORLD - reference.item()) < ATOL, name
        for got, want in zip(_average_grads(grads[:-1]), reference_grads):
            assert _max_diff(got, want) < ATOL, (name, _max_diff(got, want))
        # The local input gets d(sum of all ranks' losses)/dx = WORLD × the global-mean gradient.
        x_ref = x.clone().requires_grad_(True)
        (x_grad_ref,) = torch.autograd.grad(loss_fn(q, z, model(x_ref)), [x_ref])
        assert _max_diff(grads[-1], WORLD * x_grad_ref[mine]) < ATOL, name


def _check_sync_batchnorm(rank: int) -> None:
    """A head with GlobalBatchNorm1d on 2×3 rows equals the plain head on the 6-row global batch."""
    torch.manual_seed(1)
    reference = mlp([5, 8, 8, 3], act=torch.nn.GELU)
    head = convert_sync_batchnorm(copy.deepcopy(reference))
    x = torch.randn(6, 5)
    mine = slice(rank * 3, (rank + 1) * 3)

    want = reference(x)
    reference_loss = (want ** 2).sum(dim=1).mean()
    reference_grads = torch.autograd.grad(reference_loss, list(reference.parameters()))

    got = head(x[mine])
    assert _max_diff(got, want[mine]) < ATOL
    loss = (got ** 2).sum(dim=1).mean()
    grads = torch.autograd.grad(loss, list(head.parameters()))
    for g, w in zip(_average_grads(grads), reference_grads):
        assert _max_diff(g, w) < ATOL, _max_diff(g, w)
    for name, buffer in reference.named_buffers():
        assert _max_diff(dict(head.named_buffers())[name].float(), buffer.float()) < ATOL, name


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)                           # two processes share the two cores
        _check_helpers_and_gather(rank)
        _check_loss_gradients(rank)
        _check_sync_batchnorm(rank)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    try:
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as error:           # show the worker's assertion, not just "process failed"
        pytest.fail(str(error))
