"""Keyed random streams: a function of (seed, step, sample index) only."""

from __future__ import annotations

import torch

from sslbench.core.rng import KeyedRandom


def test_streams_depend_only_on_seed_step_and_key():
    keys = torch.arange(1000)
    full = KeyedRandom(0, 7, keys)
    a, b = full.rand(5), full.randn(3)
    part = KeyedRandom(0, 7, keys[600:])  # another process holding a slice of the batch
    assert torch.equal(part.rand(5), a[600:]) and torch.equal(part.randn(3), b[600:])
    assert not torch.equal(KeyedRandom(1, 7, keys).rand(5), a)
    assert not torch.equal(KeyedRandom(0, 8, keys).rand(5), a)
    assert not torch.equal(full.rand(5), a)  # every call is a new stream


def test_distributions():
    r = KeyedRandom(3, 0, torch.arange(200_000))
    u = r.rand(1)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    n = r.randn(1)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    i = r.randint(6, 1)
    counts = torch.bincount(i.flatten(), minlength=6).float() / i.numel()
    assert i.min() == 0 and i.max() == 5 and (counts - 1 / 6).abs().max() < 0.005
    assert abs(r.bernoulli(0.2, 1).float().mean() - 0.2) < 0.005


def test_select_continues_the_streams_of_a_subset():
    keys = torch.arange(10)
    r1, r2 = KeyedRandom(0, 1, keys), KeyedRandom(0, 1, keys)
    r1.rand(2)
    r2.rand(2)
    mask = keys % 2 == 0
    assert torch.equal(r1.select(mask).rand(4), r2.rand(4)[mask])


def test_to_continues_the_streams_on_another_device():
    # The trainer draws the views from host streams, then the masks from the same streams moved to the device.
    keys = torch.arange(10)
    host, reference = KeyedRandom(0, 1, keys), KeyedRandom(0, 1, keys)
    host.rand(3)
    reference.rand(3)
    moved = host.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.rand(4), reference.rand(4))
