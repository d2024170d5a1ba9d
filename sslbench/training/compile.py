"""``run.compile``: ``torch.compile`` of the step's compute, region by region, for the duration of a stage.

What is compiled (:func:`compile_targets`) is the repeated, shape-stable compute of an objective: every transformer
block (timm's ``Block`` and sslbench's post-norm subclass — the backbone's blocks, an MAE decoder's, a teacher's) and
every MLP head (a ``nn.Sequential`` of ``Linear`` layers with norms/activations, as :func:`sslbench.core.modules.mlp`
builds). Each is compiled in place with :meth:`torch.nn.Module.compile`, so the module tree, the parameter names and
every state dict stay exactly as without compile (no ``_orig_mod.`` prefix), and the Python around them — masks,
intermediate-block outputs, gradient checkpointing, queues, EMA updates, distributed gathers — runs eagerly as
before. Blocks of one architecture share their compiled code (dynamo guards on the module's structure, not its
identity), so a 12-block encoder compiles one block graph per token count, not twelve.

Shapes are static (``dynamic=False``): a stage sees a few token counts (MAE: the kept tokens; MIM-Refiner: global and
local crops), each compiled once, and static shapes give inductor the most to fuse.

Two implementation choices come with it, both for the duration of the stage only: on the CPU the attention of the
compiled blocks is written out (:func:`written_out_attention`), and the trainer builds AdamW with its fused kernel
(:func:`sslbench.training.optim.build_optimizer`). A run without compile is untouched by either.

Compilation is undone when the stage ends (:func:`compiled`): a module's compiled call is bound to that very module,
so a ``copy.deepcopy`` of a compiled module (an EMA teacher made for the next stage) would call the original's
weights; and evaluation runs eagerly on other batch sizes, where a compile would cost more than it saves. The online
``[monitor]`` runs eagerly too (``torch.compiler.set_stance("force_eager")``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from timm.models.vision_transformer import Block
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the torch.compile backend; ``aot_eager`` (tracing and autograd, no code generation) for fast tests only
BACKEND_ENV = "SSLBENCH_COMPILE_BACKEND"


def _is_mlp(module: nn.Module) -> bool:
    children = list(module.children())
    return (isinstance(module, nn.Sequential) and len(children) > 1
            and any(isinstance(c, nn.Linear) for c in children)
            and all(not any(True for _ in c.children()) for c in children))


def compile_targets(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` that :func:`compiled` compiles: transformer blocks and MLP heads, outermost
    first (a block's own MLP is part of the block). An objective can name its own with a ``compile_targets()``
    method returning modules."""
    custom = getattr(module, "compile_targets", None)
    if callable(custom):
        return list(custom())
    targets: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if isinstance(m, Block) or _is_mlp(m):
            targets.append(m)
            return
        for child in m.children():
            walk(child)

    walk(module)
    return targets


def compile_modules(modules: list[nn.Module], mode: str = "default", backend: str | None = None) -> None:
    """Compile each module in place (:meth:`torch.nn.Module.compile`, static shapes)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    # Entries of one code object (timm's Block.forward, shared by every block of every objective and stage) count
    # against one limit, past which dynamo runs that code eagerly: a MAE stage and two MIM-Refiner stages with frozen
    # and trained encoders already hold 6 of the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    for m in modules:
        m.compile(backend=backend, dynamic=False, **options)


def uncompile_modules(modules: list[nn.Module]) -> None:
    for m in modules:
        m._compiled_call_impl = None


@contextmanager
def written_out_attention(modules: list[nn.Module]) -> Iterator[int]:
    """On the CPU, the attention of timm's blocks inside ``modules`` as written-out matmuls and softmax (timm's
    non-fused path) for the duration of the block; yields how many attention modules were switched.

    Why: PyTorch's fused CPU attention kernel is slow on short sequences — on the Fashion-MNIST ViT-Ti (5 tokens in
    an MAE encoder, 17 in MiCL's) its forward and backward took 18% of an MAE step, and the written-out path,
    which inductor then fuses (scale, softmax, dropout), makes the compiled step 1.03-1.16x faster than the compiled
    step around the fused kernel (``benchmarks/bench_compile.py --ablations``). On a GPU the fused
    (flash / memory-efficient) kernels stay: they are the fast path there.
    """
    switched = []
    for module in modules:
        for sub in module.modules():
            if getattr(sub, "fused_attn", None) is True and all(p.device.type == "cpu" for p in sub.parameters()):
                sub.fused_attn = False
                switched.append(sub)
    try:
        yield len(switched)
    finally:
        for sub in switched:
            sub.fused_attn = True


@contextmanager
def compiled(module: nn.Module, enabled: bool = True, mode: str = "default",
             backend: str | None = None) -> Iterator[list[nn.Module]]:
    """Within the block, ``module``'s :func:`compile_targets` run compiled (on the CPU with
    :func:`written_out_attention`); afterwards eagerly again, as before. Yields the compiled modules (none when not
    ``enabled``)."""
    if not enabled:
        yield []
        return
    targets = [m for m in compile_targets(module) if getattr(m, "_compiled_call_impl", None) is None]
    compile_modules(targets, mode, backend)
    try:
        with written_out_attention(targets):
            yield targets
    finally:
        uncompile_modules(targets)


def eager():
    """A context in which compiled modules run their eager code (no compile, no recompile): the monitor, checks."""
    return torch.compiler.set_stance("force_eager")
