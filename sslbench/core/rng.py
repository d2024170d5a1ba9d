"""Counter-based random numbers keyed by (seed, step, sample index).

Augmentation parameters and masks drawn from :class:`KeyedRandom` depend only on the run seed, the global step and
each sample's dataset index — not on which process holds the sample nor on what ran before. That is what makes
2 processes produce exactly the 1-process result for the same global batch, and a resumed run repeat an
uninterrupted one, without shipping generator states around.

The hash is SplitMix64's finaliser applied to a combined 64-bit counter; torch's int64 arithmetic wraps on overflow,
and logical right shifts are emulated by masking after the arithmetic shift.

    >>> r = KeyedRandom(seed=0, step=3, keys=torch.tensor([5, 9]))
    >>> r.rand(4).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import math

import torch

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _wrap(v: int) -> int:
    """An arbitrary Python int as a signed int64 (two's complement)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


class KeyedRandom:
    """Per-sample random streams. Every call draws a new stream, so a fixed call order gives fixed numbers."""

    def __init__(self, seed: int, step: int, keys: torch.Tensor, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else keys.device
        base = _mix(torch.tensor(_wrap(seed * 0x100000001B3 + step), dtype=torch.int64))
        self.keys = _mix(keys.to(self.device, torch.int64) * _GOLDEN + base.to(self.device))
        self._stream = 0

    def __len__(self) -> int:
        return self.keys.shape[0]

    def _bits(self, shape: tuple[int, ...]) -> torch.Tensor:
        self._stream += 1
        n = math.prod(shape)
        counter = torch.arange(n, device=self.device, dtype=torch.int64).view(1, *shape)
        stream = _mix(torch.tensor(_wrap(self._stream * _GOLDEN), dtype=torch.int64)).to(self.device)
        key = self.keys.view(-1, *([1] * len(shape)))
        return _mix(key ^ (counter * _M2 + stream))

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform floats in [0, 1) of shape (B, *shape), 24 bits of resolution (exact in float32)."""
        return _shr(self._bits(shape), 40).to(torch.float32) / float(1 << 24)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal floats of shape (B, *shape) by the Box-Muller transform."""
        u1 = self.rand(*shape).clamp_min(1.0 / (1 << 24))
        u2 = self.rand(*shape)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers uniform in [0, high) of shape (B, *shape)."""
        return (self.rand(*shape) * high).long().clamp_max(high - 1)

    def bernoulli(self, p: float, *shape: int) -> torch.Tensor:
        """Booleans that are True with probability p, shape (B, *shape)."""
        return self.rand(*shape) < p

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self.rand(*shape)

    def to(self, device: torch.device | str) -> "KeyedRandom":
        """The same streams computed on ``device``, continuing this stream count (the numbers are equal: integer
        hashing, then an exact conversion). The trainer draws the views on the host, then the masks on the device."""
        moved = KeyedRandom.__new__(KeyedRandom)
        moved.device = torch.device(device)
        moved.keys, moved._stream = self.keys.to(moved.device), self._stream
        return moved

    def select(self, mask: torch.Tensor) -> "KeyedRandom":
        """The streams of a subset of the samples (rows where ``mask`` is True), continuing this stream count."""
        sub = KeyedRandom.__new__(KeyedRandom)
        sub.device, sub.keys, sub._stream = self.device, self.keys[mask], self._stream
        return sub
