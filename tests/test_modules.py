"""NN queue, head MLPs, single-process GlobalBatchNorm1d and the EMA teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslbench.core.modules import (
    EMA, GlobalBatchNorm1d, NNQueue, convert_sync_batchnorm, cosine_momentum, mlp,
)

from .conftest import layer_types, linears


# ----------------------------------------------------------------------------------------------- NNQueue


def rows(*values: float) -> torch.Tensor:
    """Row i is (values[i], 0): easy to recognise after a lookup."""
    return torch.tensor([[v, 0.0] for v in values])


def test_queue_fifo_order_and_wrap_around():
    queue = NNQueue(size=4, dim=2, normalize=False)
    queue.enqueue(rows(1, 2, 3), torch.tensor([1, 2, 3]))
    assert int(queue.ptr) == 3 and int(queue.filled) == 3
    assert queue.ids.tolist() == [1, 2, 3, -1]
    queue.enqueue(rows(4, 5, 6), torch.tensor([4, 5, 6]))
    # Slots 3, 0, 1 were written in that order; slot 2 keeps the oldest surviving entry.
    assert queue.values[:, 0].tolist() == [5, 6, 3, 4]
    assert queue.ids.tolist() == [5, 6, 3, 4]
    assert int(queue.ptr) == 2 and int(queue.filled) == 4


def test_queue_keeps_newest_rows_when_batch_exceeds_size():
    queue = NNQueue(size=3, dim=2, normalize=False)
    queue.enqueue(rows(1), torch.tensor([1]))
    queue.enqueue(rows(10, 11, 12, 13, 14), torch.tensor([10, 11, 12, 13, 14]))
    # Same state as writing the five rows one at a time: slots 1, 2, 0, 1, 2.
    assert queue.ids.tolist() == [12, 13, 14] and int(queue.ptr) == 0
    one_by_one = NNQueue(size=3, dim=2, normalize=False)
    for v in (1, 10, 11, 12, 13, 14):
        one_by_one.enqueue(rows(v), torch.tensor([v]))
    assert torch.equal(one_by_one.values, queue.values) and torch.equal(one_by_one.ptr, queue.ptr)
    # The next write overwrites the oldest of them (12).
    queue.enqueue(rows(15), torch.tensor([15]))
    assert sorted(queue.ids.tolist()) == [13, 14, 15]


def test_queue_lookup_ignores_empty_slots():
    queue = NNQueue(size=4, dim=2, normalize=False)
    queue.enqueue(torch.tensor([[-1.0, 0.0]]), torch.tensor([7]))
    # The only entry points the other way (cosine −1); empty zero slots (cosine 0) must not win.
    out = queue.lookup(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert torch.equal(out, torch.tensor([[-1.0, 0.0]]))


def test_empty_queue_returns_the_query():
    raw = NNQueue(size=4, dim=2, normalize=False)
    normed = NNQueue(size=4, dim=2, normalize=True)
    x = torch.tensor([[3.0, 4.0]])
    assert torch.equal(raw.lookup(x, torch.tensor([0])), x)
    assert torch.allclose(normed.lookup(x, torch.tensor([0])), torch.tensor([[0.6, 0.8]]))


def test_queue_never_returns_the_samples_own_entry():
    queue = NNQueue(size=8, dim=2, normalize=False)
    x = torch.tensor([[1.0, 0.0]])
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]]), torch.tensor([5, 6, 7]))
    # Id 5 holds exactly x; with the sample's id 5 the next best (id 7) is returned.
    assert torch.equal(queue.lookup(x, torch.tensor([5])), torch.tensor([[1.0, 0.5]]))
    # Another sample with the same vector may retrieve it.
    assert torch.equal(queue.lookup(x, torch.tensor([9])), x)
    # Several views of one batch share the ids: rows (view0 b0, view0 b1, view1 b0, view1 b1).
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = queue.lookup(queries, torch.tensor([5, 6]))
    assert torch.equal(out, torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]))


def test_queue_topk_random_pick_stays_in_and_covers_the_topk():
    queue = NNQueue(size=8, dim=2, normalize=False)
    angles = [0.0, 0.1, 0.2, 0.3, 1.0, 2.0]              # the 3 entries nearest to angle 0 are the first three
    queue.enqueue(torch.tensor([[math.cos(a), math.sin(a)] for a in angles]), torch.arange(6))
    x = torch.tensor([[1.0, -0.01]]).repeat(300, 1)
    ids = torch.full((300,), 99)
    out = queue.lookup(x, ids, topk=3, generator=torch.Generator().manual_seed(0))
    picked = {round(math.atan2(y, c), 4) for c, y in out.tolist()}
    assert picked == {0.0, 0.1, 0.2}
    again = queue.lookup(x, ids, topk=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # Each of the 3 is picked roughly a third of the time.
    counts = [(out[:, 1].sub(math.sin(a)).abs() < 1e-6).sum().item() for a in (0.0, 0.1, 0.2)]
    assert all(60 < c < 140 for c in counts)


def test_queue_normalize_flag():
    raw = NNQueue(size=4, dim=2, normalize=False)
    normed = NNQueue(size=4, dim=2, normalize=True)
    stored = torch.tensor([[3.0, 4.0]])
    for queue in (raw, normed):
        queue.enqueue(stored, torch.tensor([1]))
    x = torch.tensor([[1.0, 1.0]])
    assert torch.equal(raw.lookup(x, torch.tensor([0])), stored)
    assert torch.allclose(normed.lookup(x, torch.tensor([0])), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(normed.values[0], torch.tensor([0.6, 0.8]))


def test_queue_is_outside_autograd():
    queue = NNQueue(size=4, dim=2, normalize=False)
    x = torch.randn(3, 2, requires_grad=True)
    queue.enqueue(x * 2, torch.arange(3))
    out = queue.lookup(x, torch.arange(3) + 10)
    assert not out.requires_grad and not queue.values.requires_grad
    assert list(queue.parameters()) == []


def test_queue_state_dict_round_trip():
    queue = NNQueue(size=5, dim=3, normalize=False)
    queue.enqueue(torch.randn(7, 3), torch.arange(7))
    state = queue.state_dict()
    assert set(state) == {"values", "ids", "labels", "ptr", "filled"}
    copy = NNQueue(size=5, dim=3, normalize=False)
    copy.load_state_dict(state)
    x, ids = torch.randn(4, 3), torch.arange(4)
    assert torch.equal(copy.lookup(x, ids), queue.lookup(x, ids))
    assert int(copy.ptr) == 2 and int(copy.filled) == 5


def test_queue_rejects_bad_shapes():
    queue = NNQueue(size=4, dim=2, normalize=False)
    with pytest.raises(ValueError, match="shape"):
        queue.enqueue(torch.randn(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="ids"):
        queue.enqueue(torch.randn(2, 2), torch.arange(3))


# ----------------------------------------------------------------------------------------------- MLPs


def test_mlp_options():
    plain = mlp([3, 5, 2], act=nn.Tanh, batchnorm=False, last_bn=False)
    assert layer_types(plain) == [nn.Linear, nn.Tanh, nn.Linear]
    assert all(lin.bias is not None for lin in linears(plain))
    forced = mlp([3, 5, 2], bias=True)
    assert all(lin.bias is not None for lin in linears(forced))
    with pytest.raises(ValueError):
        mlp([3])


def test_xavier_uniform_init_statistics():
    torch.manual_seed(0)
    layer = mlp([200, 300], last_bn=False)[0]
    fan_sum = 200 + 300
    bound = math.sqrt(6 / fan_sum)
    w = layer.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    # Uniform(−a, a) has variance a²/3 = 2 / (fan_in + fan_out).
    assert abs(w.var().item() - 2 / fan_sum) < 0.03 * (2 / fan_sum)
    assert abs(w.mean().item()) < 1e-3
    assert torch.all(layer.bias == 0)


# ----------------------------------------------------------------------------------------------- BatchNorm


def test_global_batchnorm_matches_batchnorm_in_one_process():
    torch.manual_seed(0)
    head = mlp([6, 10, 10, 3], act=nn.GELU)
    reference = mlp([6, 10, 10, 3], act=nn.GELU)
    reference.load_state_dict(head.state_dict())
    converted = convert_sync_batchnorm(head)
    assert sum(isinstance(m, GlobalBatchNorm1d) for m in converted.modules()) == 3
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
    x = torch.randn(7, 6)
    assert torch.allclose(converted(x), reference(x), atol=1e-6)
    assert torch.allclose(converted[1].running_var, reference[1].running_var)
    converted.eval(), reference.eval()
    assert torch.allclose(converted(x), reference(x), atol=1e-6)


def test_convert_sync_batchnorm_keeps_state_and_flags():
    bn = nn.BatchNorm1d(4, affine=False, momentum=None)
    bn.running_mean.fill_(2.0)
    converted = convert_sync_batchnorm(bn)
    assert isinstance(converted, GlobalBatchNorm1d)
    assert not converted.affine and converted.momentum is None
    assert torch.all(converted.running_mean == 2.0)


# ----------------------------------------------------------------------------------------------- EMA


class Scalar(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(value))
        self.register_buffer("count", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta * x


def test_ema_update_math_on_one_parameter():
    student = Scalar(1.0)
    teacher = EMA(student, momentum=0.9)
    with torch.no_grad():
        student.theta.fill_(3.0)
    teacher.update(student)
    assert math.isclose(teacher.module.theta.item(), 0.9 * 1.0 + 0.1 * 3.0, rel_tol=1e-6)   # 1.2
    teacher.update(student, momentum=0.5)
    assert math.isclose(teacher.module.theta.item(), 0.5 * 1.2 + 0.5 * 3.0, rel_tol=1e-6)   # 2.1
    assert student.theta.item() == 3.0


def test_ema_teacher_has_no_grad():
    student = Scalar(2.0)
    teacher = EMA(student, momentum=0.99)
    assert not teacher.module.theta.requires_grad and student.theta.requires_grad
    out = teacher(torch.ones(3, requires_grad=True))
    assert not out.requires_grad


def test_ema_copy_buffers_option():
    student = Scalar(0.0)
    copying = EMA(student, momentum=0.5, copy_buffers=True)
    keeping = EMA(student, momentum=0.5, copy_buffers=False)
    student.count.fill_(7.0)
    copying.update(student)
    keeping.update(student)
    assert copying.module.count.item() == 7.0 and keeping.module.count.item() == 0.0


def test_ema_rejects_a_different_architecture():
    teacher = EMA(nn.Linear(2, 2), momentum=0.9)
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Sequential(nn.Linear(2, 2)))


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx((0.996 + 1.0) / 2)
    assert cosine_momentum(25, 100, 0.9, final=0.99) == pytest.approx(0.99 - 0.09 * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(s, 10, 0.99) for s in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert cosine_momentum(500, 100, 0.99) == pytest.approx(1.0)


def test_queue_topk_pick_from_keyed_numbers_depends_on_the_row_not_on_the_batch_split():
    queue = NNQueue(10, 2, normalize=False)
    angles = torch.linspace(0, 1.5, 10)
    queue.enqueue(torch.stack([angles.cos(), angles.sin()], 1), torch.arange(10) + 100)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.2]])
    u = torch.tensor([0.0, 0.99, 0.5, 0.3])
    whole = queue.lookup(x, torch.arange(4), topk=3, uniform=u)
    halves = torch.cat([queue.lookup(x[:2], torch.arange(2), topk=3, uniform=u[:2]),
                        queue.lookup(x[2:], torch.arange(2, 4), topk=3, uniform=u[2:])])
    assert torch.equal(whole, halves)
    top3 = (torch.nn.functional.normalize(x, dim=1) @ queue.values.T).topk(3).indices
    assert torch.equal(whole[0], queue.values[top3[0, 0]]) and torch.equal(whole[1], queue.values[top3[1, 2]])
    assert torch.equal(queue.lookup(x, torch.arange(4), topk=1, uniform=u), queue.lookup(x, torch.arange(4)))


def test_queue_lookup_picks_the_fp32_nearest_neighbour_under_bf16_autocast():
    """Neighbours are chosen on fp32 cosines whatever the autocast: among 2,000 stored vectors many are near-ties
    that bf16 products would order differently (this test fails when the similarity matmul runs under autocast)."""
    g = torch.Generator().manual_seed(0)
    queue = NNQueue(size=2000, dim=64, normalize=False)
    queue.enqueue(torch.randn(2000, 64, generator=g), torch.arange(2000))
    queries = torch.randn(256, 64, generator=g)
    ids = torch.full((256,), -1)
    plain = queue.lookup(queries, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = queue.lookup(queries, ids)
    assert torch.equal(mixed, plain)


def test_queue_keeps_labels_with_entries_and_returns_the_chosen_ones():
    queue = NNQueue(size=3, dim=2, normalize=False)
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([10, 11]), torch.tensor([4, 7]))
    queue.enqueue(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]), torch.tensor([12, 13]))   # no labels: stored as -1
    assert queue.labels.tolist() == [-1, 7, -1]                                  # slot 0 overwritten by id 13
    values, labels = queue.lookup(torch.tensor([[0.1, 1.0], [0.0, -2.0]]), torch.tensor([0, 1]),
                                  return_labels=True)
    assert torch.equal(values, torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    assert labels.tolist() == [7, -1]
    # the lookup is the same with or without labels returned
    assert torch.equal(queue.lookup(torch.tensor([[0.1, 1.0]]), torch.tensor([0])), torch.tensor([[0.0, 1.0]]))
    empty = NNQueue(size=3, dim=2, normalize=False)
    assert empty.lookup(torch.ones(2, 2), return_labels=True)[1].tolist() == [-1, -1]


def test_queue_state_without_labels_loads_with_unknown_labels():
    """A checkpoint written before the queue kept labels resumes: same entries, labels unknown."""
    queue = NNQueue(size=3, dim=2, normalize=False)
    queue.enqueue(rows(1, 2), torch.tensor([1, 2]), torch.tensor([5, 6]))
    old_state = {k: v for k, v in queue.state_dict().items() if k != "labels"}
    restored = NNQueue(size=3, dim=2, normalize=False)
    restored.load_state_dict(old_state)
    assert torch.equal(restored.values, queue.values) and restored.ids.tolist() == [1, 2, -1]
    assert restored.labels.tolist() == [-1, -1, -1]
