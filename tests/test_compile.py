"""``run.compile``: compiled and eager steps agree for every registered objective; the compiled regions (blocks, MLP
heads) trace without graph breaks; state dicts, checkpoints and ``backbone.pt`` keep their keys; a compiled run
resumes after SIGKILL to the uninterrupted compiled run.

The default run compiles with ``backend="aot_eager"`` (dynamo tracing, graph breaks and AOT autograd, no code
generation: seconds); the inductor versions (C++ code generation, minutes on 2 cores) are marked slow.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from sslbench.core.backbone import build_backbone
from sslbench.core.modules import mlp
from sslbench.training.resume import load_resume_state
from sslbench.training.compile import BACKEND_ENV, compile_targets, compiled, written_out_attention

from .conftest import dump_recipe, kill_after_log_lines, sslbench_cmd
from .plugins.test_registered_objectives import OBJECTIVES, build, one_step


def _losses_and_grads(name: str, compile_backend: str | None, grad_checkpointing: bool = False):
    """Two steps of ``name`` (step 0 with backward and ``after_step``, then step 1): losses and step 0's gradients."""
    objective = build(name)
    objective.train()
    objective.backbone.set_grad_checkpointing(grad_checkpointing)
    # The eager reference writes the attention out as the compiled step does on the CPU, so that the comparison is
    # of compilation alone (written-out against fused attention: its own test below).
    reference = written_out_attention([objective]) if compile_backend is None else nullcontext()
    with reference, compiled(objective, enabled=compile_backend is not None, backend=compile_backend) as targets:
        assert compile_backend is None or targets
        first = one_step(objective, 0)["loss"]
        first.backward()
        grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
        objective.after_step(0)
        second = one_step(objective, 1)["loss"]
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in compile_targets(objective))
    return [first.item(), second.item()], grads


def _assert_same(name: str, backend: str, grad_checkpointing: bool = False):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()                    # every objective compiles from scratch (no recompile limit reached)
    counters.clear()
    eager_losses, eager_grads = _losses_and_grads(name, None, grad_checkpointing)
    assert not counters["stats"]
    losses, grads = _losses_and_grads(name, backend, grad_checkpointing)
    # really compiled (not silently eager), without a graph break, a few graphs (one per shape and module kind)
    assert 1 <= counters["stats"]["unique_graphs"] <= 6 and not counters["graph_break"], dict(counters)
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert grads.keys() == eager_grads.keys()
    # rounding: small against each gradient's norm, or absolutely where a gradient is rounding noise itself (the bias
    # before a BatchNorm, ~1e-6), and against the norm of all of them
    for key, grad in grads.items():
        assert (grad - eager_grads[key]).norm() <= 1e-3 * eager_grads[key].norm() + 1e-5, key
    flat, eager_flat = (torch.cat([g.flatten() for g in d.values()]) for d in (grads, eager_grads))
    # 2e-4: inductor's fused reductions round differently; ConMIM's whole gradient lands at 1.0e-4 of its norm (also
    # before the written-out attention), while each parameter's gradient stays within the 1e-3 above
    assert (flat - eager_flat).norm() <= 2e-4 * eager_flat.norm()


@pytest.mark.parametrize("name", OBJECTIVES)
def test_compiled_and_eager_losses_agree(name):
    _assert_same(name, "aot_eager")


def test_compiled_with_gradient_checkpointing():
    _assert_same("mim_refiner", "aot_eager", grad_checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", OBJECTIVES)
def test_inductor_and_eager_losses_agree(name):
    _assert_same(name, "inductor")


@pytest.mark.slow
def test_inductor_with_gradient_checkpointing():
    _assert_same("mae", "inductor", grad_checkpointing=True)


@pytest.mark.parametrize("block", ["pre_norm", "post_norm"])
def test_blocks_and_heads_trace_without_graph_breaks(block):
    torch._dynamo.reset()
    backbone = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, block=block)
    head = mlp([32, 64, 64, 16])
    for module, x in [(backbone.vit.blocks[0], torch.randn(4, 17, 32, requires_grad=True)),
                      (head, torch.randn(8, 32, requires_grad=True))]:
        explained = torch._dynamo.explain(module)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert compile_targets(nn.ModuleDict({"b": backbone, "h": head})) == [*backbone.vit.blocks, head]


def test_state_dict_keys_are_those_of_the_eager_module():
    objective = build("mim_refiner")
    keys = list(objective.state_dict())
    with compiled(objective, backend="aot_eager") as targets:
        assert targets and list(objective.state_dict()) == keys
        assert list(objective.backbone.vit.state_dict()) == [k.removeprefix("backbone.vit.") for k in keys
                                                             if k.startswith("backbone.vit.")]
        assert not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("name", ["mae", "micl"])
def test_compile_writes_the_attention_out_on_the_cpu_and_restores_it(name):
    """Within ``compiled`` timm's attention modules take the written-out path (the fused CPU kernel is slow on short
    sequences); the same objective step gives the same loss either way, and the modules are fused again after."""
    objective = build(name)
    objective.train()
    attentions = [m for m in objective.modules() if hasattr(m, "fused_attn")]
    for m in attentions:
        m.fused_attn = True                      # timm's default with a recent torch (TIMM_FUSED_ATTN may change it)
    fused_loss = one_step(objective, 0)["loss"]
    with compiled(objective, backend="aot_eager"):
        assert attentions and not any(m.fused_attn for m in attentions)
    assert all(m.fused_attn for m in attentions)
    with written_out_attention([objective]) as switched:
        assert switched == len(attentions)
        written_out_loss = one_step(objective, 0)["loss"]
    assert written_out_loss.item() == pytest.approx(fused_loss.item(), rel=1e-5)
    assert all(m.fused_attn for m in attentions)


def test_written_out_attention_leaves_modules_on_other_devices_alone():
    block = build_backbone("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1).vit.blocks[0].to("meta")
    block.attn.fused_attn = True
    with written_out_attention([block]) as switched:
        assert switched == 0 and block.attn.fused_attn


def _run_recipe(tiny_recipe, tmp_path, name: str, compile_on: bool, monitor: bool = False) -> dict:
    recipe = copy.deepcopy(tiny_recipe)
    if monitor:                                  # measured eagerly between compiled steps; trains nothing
        recipe["monitor"] = {"every_steps": 3, "train_samples": 64, "test_samples": 32}
    recipe["run"].update(name=name, checkpoint_every=2, compile=compile_on, evaluate="never")
    recipe["stages"][0].update(steps=6, batch_size=32, ema_momentum=0.9)
    recipe["eval"] = []
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_recipe(recipe))
    return {"path": path, "dir": tmp_path / "runs" / name}


def test_a_compiled_run_saves_the_eager_keys_and_resumes(tiny_recipe, tmp_path):
    """Checkpoints and backbone.pt of a compiled run (with EMA and the online monitor) have the eager run's keys; a
    compiled run killed after a checkpoint and resumed ends where the uninterrupted compiled run ends."""
    env = {**os.environ, "TQDM_DISABLE": "1", BACKEND_ENV: "aot_eager"}
    runs = {name: _run_recipe(tiny_recipe, tmp_path, name, compile_on, monitor=name != "killed")
            for name, compile_on in [("eager", False), ("compiled", True), ("killed", True)]}
    for name in ("eager", "compiled"):
        done = subprocess.run(sslbench_cmd() + ["run", str(runs[name]["path"])], capture_output=True, text=True,
                              env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    def keys(run_dir):
        last = load_resume_state(run_dir / "checkpoints" / "last.pt")
        exported = torch.load(run_dir / "checkpoints" / "backbone.pt", map_location="cpu", weights_only=True)
        return ([list(last[part]) for part in ("objective", "backbone", "ema")],
                list(exported["backbone"]), list(exported["ema"]))

    eager_keys, compiled_keys = keys(runs["eager"]["dir"]), keys(runs["compiled"]["dir"])
    assert compiled_keys == eager_keys
    assert "_orig_mod" not in json.dumps(compiled_keys)

    killed = runs["killed"]
    kill_after_log_lines(["run", str(killed["path"])], killed["dir"] / "log.jsonl", 3, env)
    resumed = subprocess.run(sslbench_cmd() + ["run", str(killed["path"]), "--resume"], capture_output=True,
                             text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = [json.loads(x) for x in (runs["compiled"]["dir"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reference if r.get("kind") == "monitor"] == [0, 3, 6]
    reference = [r for r in reference if r.get("kind") != "monitor"]
    log = [json.loads(x) for x in (killed["dir"] / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-5)


def test_compile_is_hashed_only_when_on(tiny_recipe, tmp_path):
    """Off (the default), run.compile and run.compile_mode leave the recipe hash and a run's seed family as they were
    before the keys existed; on, a compiled run is another recipe, and so is another mode."""
    from sslbench.core.registry import get_registry
    from sslbench.results.aggregate import recipe_family
    from sslbench.training.recipe import resolve

    def hashed(**run):
        recipe = copy.deepcopy(tiny_recipe)
        recipe["run"].update(run)
        return resolve(recipe, get_registry()).recipe_hash

    base = hashed()
    assert hashed(compile=False) == base and hashed(compile=False, compile_mode="max-autotune") == base
    assert hashed(compile=True) != base
    assert hashed(compile=True, compile_mode="max-autotune") not in (base, hashed(compile=True))

    resolved = resolve(copy.deepcopy(tiny_recipe), get_registry()).as_dict()
    assert resolved["run"]["compile"] is False
    old = copy.deepcopy(resolved)
    for key in ("compile", "compile_mode"):
        del old["run"][key]                                      # a recipe.json written before the keys existed
    families = []
    for name, recipe in [("new", resolved), ("old", old)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.json").write_text(json.dumps({"recipe": recipe}))
        families.append(recipe_family(str(tmp_path / name)))
    assert families[0] and families[0] == families[1]
