"""A frozen teacher: a pre-trained network an objective learns from without ever training it (MimCo's contrastive
teacher, Zhou et al. 2022).

:class:`FrozenTeacher` wraps a :class:`~sslbench.core.backbone.Backbone` so that the promises a recipe's
``[stages.teacher]`` makes hold by construction rather than by care in each objective:

* **never trained** — every parameter has ``requires_grad = False`` and the network is *not a registered
  submodule* of the teacher (it sits in the instance ``__dict__``), so ``objective.parameters()`` — what the
  optimiser, the ``freeze`` patterns, gradient clipping and DDP's gradient buckets see — never contains it;
* **not state** — for the same reason ``objective.state_dict()`` holds none of its tensors: checkpoints stay small
  and a resumed run reloads the teacher from its file (whose content hash is part of the recipe hash);
* **always in eval mode** — :meth:`train` is a no-op, so ``objective.train()`` cannot switch dropout or
  normalisation statistics on;
* **no autograd graph** — :meth:`forward` runs under ``torch.no_grad()``; autocast is the caller's, so it runs
  under the run's precision like the student.

It still follows the objective across devices and dtypes: ``.to()``, ``.cuda()``, ``.half()`` reach it through
:meth:`_apply`. Under DDP every process builds and loads its own copy (nothing to broadcast, nothing to reduce).

>>> from sslbench.core.backbone import build_backbone
>>> net = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1,
...                      num_heads=2)
>>> teacher = FrozenTeacher(net)
>>> list(teacher.parameters()), teacher.state_dict()
([], OrderedDict())
>>> teacher(torch.zeros(2, 1, 16, 16)).tokens.requires_grad
False
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenTeacher(nn.Module):
    """A frozen :class:`~sslbench.core.backbone.Backbone` (``self.network``); ``source`` says where its weights came
    from (for messages and logs). Size attributes (``embed_dim``, ``patch_size``, ``grid_size``, ``num_patches``,
    ``num_prefix_tokens``, ``img_size``, ``depth``) are the network's."""

    def __init__(self, network: nn.Module, source: str = ""):
        super().__init__()
        network.requires_grad_(False)
        network.eval()
        # Not a registered child, on purpose: see the module docstring.
        self.__dict__["network"] = network
        self.source = source
        self.training = False

    def __getattr__(self, name: str):
        if name in ("embed_dim", "patch_size", "grid_size", "num_patches", "num_prefix_tokens", "img_size",
                    "depth", "in_chans", "model_name"):
            return getattr(self.__dict__["network"], name)
        return super().__getattr__(name)

    def forward(self, images: torch.Tensor, **kwargs):
        """The network's :meth:`~sslbench.core.backbone.Backbone.forward` without gradient."""
        with torch.no_grad():
            return self.network(images, **kwargs)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Stays in eval mode whatever ``mode`` is (an objective's ``.train()`` reaches here)."""
        self.training = False
        self.network.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .half() of the objective: move the hidden network along with the registered modules.
        self.network._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        net = self.network
        return (f"{getattr(net, 'model_name', type(net).__name__)}, width {getattr(net, 'embed_dim', '?')}, "
                f"frozen{', from ' + self.source if self.source else ''}")
