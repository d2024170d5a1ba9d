"""The random draws of a view step: made on the host, moved to the training device in one copy.

A view pipeline's random transforms split into ``draw`` (host: every random number the transform needs, taken
from the random source in a fixed order, plus whatever decision depends on them — crop boxes after rejection
sampling, the indices of the samples a blur applies to) and ``apply_draws`` (device: pure tensor ops on the
moved draws, no host reads). :func:`to_device` packs every tensor of a step's draws into one float32 buffer,
copies it with a single non-blocking transfer (from pinned memory on CUDA) and unpacks it on the device.

On a GPU this replaces a device→host copy or read per random draw (72 for a 2 + 10 multi-crop step) and three
blocking host→device copies per view by one host→device copy per step; the numbers are the same ones, drawn in
the same order, so the views are bit-identical to drawing transform by transform.

>>> draws = {"u": torch.rand(4), "index": torch.tensor([0, 2]), "any": True}
>>> moved = to_device(draws, "meta")
>>> moved["index"].dtype, moved["index"].device.type, moved["any"]
(torch.int64, 'meta', True)
"""

from __future__ import annotations

from typing import Any, Protocol, Union

import torch
from torch import Tensor


class PerSampleRandom(Protocol):
    """Per-sample random streams (e.g. :class:`sslbench.core.rng.KeyedRandom`): ``rand(*shape)`` → ``(B, *shape)``.

    The trainer keys them by (seed, step, dataset index), so a sample gets the same augmentation whichever
    process holds it — N processes reproduce the 1-process run.
    """

    def rand(self, *shape: int) -> Tensor: ...


Random = Union[torch.Generator, PerSampleRandom]
Shape = tuple[int, ...]  # (B, C, H, W) of the batch a transform will see

_EXACT = 1 << 24  # integers below this survive a round trip through float32


def host_rand(rng: Random, n: int, *shape: int) -> Tensor:
    """Uniform ``[0, 1)`` float32 of shape ``(n, *shape)`` on the host, from a generator or per-sample streams.

    Per-sample streams (``KeyedRandom``) should live on the host (keys on the CPU): then nothing here waits for
    a device. Streams on a device work too, at the price of one device→host copy per call.
    """
    if isinstance(rng, torch.Generator):
        out = torch.rand(n, *shape, generator=rng, device=rng.device)
    else:
        out = rng.rand(*shape)
        if out.shape[0] != n:
            raise ValueError(f"per-sample random source has {out.shape[0]} streams for a batch of {n}")
    return out.to("cpu", torch.float32)


def _leaves(tree: Any, out: list[Tensor]) -> None:
    if torch.is_tensor(tree):
        out.append(tree)
    elif isinstance(tree, dict):
        for value in tree.values():
            _leaves(value, out)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _leaves(value, out)


def _rebuild(tree: Any, moved: Any) -> Any:
    if torch.is_tensor(tree):
        return next(moved)
    if isinstance(tree, dict):
        return {key: _rebuild(value, moved) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(value, moved) for value in tree)
    return tree


def _check_exact(t: Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bool, torch.int64, torch.int32):
        raise TypeError(f"draws must be float32, bool or integer tensors to travel in one float32 copy, got {t.dtype}")
    if t.dtype in (torch.int64, torch.int32) and t.numel() and int(t.abs().max()) >= _EXACT:
        raise ValueError("integer draws must stay below 2**24 to travel exactly as float32")


def to_device(draws: Any, device: torch.device | str, copy: bool = False) -> Any:
    """``draws`` (nested dicts / lists / tuples of host tensors and plain values) with every tensor on ``device``,
    moved in one copy; plain values (host decisions such as "no sample chosen") stay as they are.

    Float32, bool and integer (< 2**24) tensors travel in one float32 buffer and come back exactly with their
    dtypes. Draws already on ``device`` are returned unchanged unless ``copy`` (the packed path, for tests).
    """
    device = torch.device(device)
    leaves: list[Tensor] = []
    _leaves(draws, leaves)
    if not leaves or (not copy and all(t.device == device for t in leaves)):
        return draws
    for t in leaves:
        _check_exact(t)
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in leaves])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)  # the step's only host→device copy of random numbers
    pieces = flat.split([t.numel() for t in leaves])
    moved = iter([piece.view(t.shape).to(t.dtype) for piece, t in zip(pieces, leaves)])
    return _rebuild(draws, moved)


class DrawnTransform:
    """A transform in two halves: :meth:`draw` (host: its random numbers, in a fixed order) and
    :meth:`apply_draws` (device: pure tensor ops on the moved draws). ``t(x, rng)`` does both for one call;
    pipelines draw for every transform of every view first and move all the draws at once.

    Deterministic transforms draw nothing (``None``) and take ``rng=None``.
    """

    plannable = True  # every part splits into draw / apply_draws (a Compose of arbitrary callables does not)

    def draw(self, shape: Shape, dtype: torch.dtype, rng: Random) -> Any:
        """The draws for a batch of ``shape`` and ``dtype``; host tensors and plain values only."""
        return None

    def out_shape(self, shape: Shape) -> Shape:
        """The shape of the output for an input of ``shape`` (crops and resizes change it)."""
        return shape

    def apply_draws(self, x: Tensor, draws: Any) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, rng: Random | None = None) -> Tensor:
        return self.apply_draws(x, to_device(self.draw(tuple(x.shape), x.dtype, rng), x.device))


def plannable(transform: Any) -> bool:
    """Whether ``transform``'s draws can be made ahead of its application (see :class:`DrawnTransform`)."""
    return isinstance(transform, DrawnTransform) and transform.plannable
