"""data2vec 2.0 checkpoints in every release layout load exactly: the backbone computes what fairseq's image encoder
computes, written out below in plain torch from the file's own tensors (never through the converter).

Layouts (sslbench/core/data2vec2.py): ViT-L/H (no prenet), ViT-B (``prenet_depth: 2`` blocks under
``modality_encoders.IMAGE.context_encoder.blocks`` before ``blocks``), fine-tuned (``model.*`` + ``fc_norm`` + ``head``).
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.core.backbone import build_backbone
from sslbench.core.checkpoints import BUILTIN_FORMATS, load_checkpoint
from sslbench.core.data2vec2 import Layout, convert_data2vec2, layout_of
from sslbench.core.errors import UserError
from sslbench.evaluation.features import pool

TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, num_heads=2)
HEADS, DIM, GRID = 2, 32, 7
ATOL = 1e-5
P = "modality_encoders.IMAGE."


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def fresh(depth: int):
    torch.manual_seed(123)  # other weights than the file's, so a load that does nothing cannot pass
    return build_backbone("vit_tiny_patch16_224", depth=depth, **TINY,
                          **BUILTIN_FORMATS["data2vec2"].architecture).eval()


def _block(prefix: str, r) -> dict[str, torch.Tensor]:
    return {prefix + "norm1.weight": 1 + r(DIM), prefix + "norm1.bias": r(DIM),
            prefix + "attn.qkv.weight": r(3 * DIM, DIM), prefix + "attn.qkv.bias": r(3 * DIM),
            prefix + "attn.proj.weight": r(DIM, DIM), prefix + "attn.proj.bias": r(DIM),
            prefix + "norm2.weight": 1 + r(DIM), prefix + "norm2.bias": r(DIM),
            prefix + "mlp.fc1.weight": r(4 * DIM, DIM), prefix + "mlp.fc1.bias": r(4 * DIM),
            prefix + "mlp.fc2.weight": r(DIM, 4 * DIM), prefix + "mlp.fc2.bias": r(DIM)}


def pretraining_state(depth: int = 2, prenet: int = 0, seed: int = 2) -> dict[str, torch.Tensor]:
    """Random tensors in fairseq's data2vec 2.0 image-model key layout: ``prenet`` blocks in the context encoder,
    ``depth`` main blocks (ViT-B: 2 + 10; ViT-L/H: 0 + 24 / 32)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {P + "local_encoder.proj.weight": r(DIM, 1, 4, 4), P + "local_encoder.proj.bias": r(DIM),
             P + "extra_tokens": r(1, 1, DIM, scale=1.0), P + "fixed_positional_encoder.positions": r(1, GRID**2, DIM),
             P + "context_encoder.norm.weight": 1 + r(DIM), P + "context_encoder.norm.bias": r(DIM)}
    for i in range(prenet):
        state.update(_block(f"{P}context_encoder.blocks.{i}.", r))
    for i in range(depth):
        state.update(_block(f"blocks.{i}.", r))
    return state


def finetuned_state(depth: int = 2, prenet: int = 2) -> dict[str, torch.Tensor]:
    """fairseq's ``mae_image_classification`` state dict: the encoder under ``model.*``, beside the pooling
    LayerNorm ``fc_norm`` and the classifier ``head`` (10 classes)."""
    g = torch.Generator().manual_seed(5)
    state = {"model." + k: v for k, v in pretraining_state(depth, prenet, seed=3).items()}
    state.update({"fc_norm.weight": 1 + 0.3 * torch.randn(DIM, generator=g),
                  "fc_norm.bias": 0.3 * torch.randn(DIM, generator=g),
                  "head.weight": torch.randn(10, DIM, generator=g), "head.bias": torch.randn(10, generator=g)})
    return state


def fairseq_encoder(s: dict[str, torch.Tensor], images: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """fairseq's ``Data2VecMultiModel.extract_features(mode="IMAGE", mask=False)`` for a post-norm model, from the
    file's tensors: patch embedding + fixed positions, CLS first, ``context_encoder.norm``, the prenet blocks
    (``context_encoder.blocks``), then ``blocks`` (AltBlock with ``layer_norm_first=False``); no final norm.
    Returns the tokens after each block, prenet blocks first."""
    w = s[P + "local_encoder.proj.weight"]
    x = F.conv2d(images, w, s[P + "local_encoder.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + s[P + "fixed_positional_encoder.positions"]
    x = torch.cat([s[P + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)

    def ln(t, name):
        return F.layer_norm(t, (DIM,), s[name + ".weight"], s[name + ".bias"], eps)

    def alt_block(x, b):
        batch, tokens, _ = x.shape
        qkv = F.linear(x, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * (DIM // HEADS) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(batch, tokens, DIM), s[b + "attn.proj.weight"],
                         s[b + "attn.proj.bias"])
        r = x = ln(x, b + "norm1")
        hidden = F.gelu(F.linear(x, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        return ln(r + F.linear(hidden, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"]), b + "norm2")

    x = ln(x, P + "context_encoder.norm")
    states = []
    for group in (P + "context_encoder.blocks.", "blocks."):
        i = 0
        while f"{group}{i}.norm1.weight" in s:
            x = alt_block(x, f"{group}{i}.")
            states.append(x)
            i += 1
    return states


def fairseq_classifier(s: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's ``MaeImageClassificationModel.forward`` (MEAN_POOLING, use_fc_norm): the patch tokens of the last
    block (CLS removed), averaged, through ``fc_norm`` (eps 1e-6), then ``head``. Returns (feature, logits)."""
    encoder = {k[len("model."):]: v for k, v in s.items() if k.startswith("model.")}
    tokens = fairseq_encoder(encoder, images)[-1][:, 1:]
    feature = F.layer_norm(tokens.mean(dim=1), (DIM,), s["fc_norm.weight"], s["fc_norm.bias"], 1e-6)
    return feature, F.linear(feature, s["head.weight"], s["head.bias"])


def assert_same_function(backbone, state, images):
    expected = fairseq_encoder(state, images)
    assert len(expected) == backbone.depth
    with torch.no_grad():
        out = backbone(images, blocks=list(range(backbone.depth)), out="raw")
    for index, tokens in enumerate(expected):    # block by block: the prenet blocks run first, in order
        assert torch.allclose(out.raw[index], tokens, atol=ATOL), f"block {index}"
    assert torch.allclose(out.tokens, expected[-1], atol=ATOL)     # no final norm


# --- the conversion on hand-written keys --------------------------------------------------------------------------

def test_prenet_blocks_come_first_and_main_blocks_shift():
    one = torch.zeros(1)
    state = {P + "context_encoder.blocks.0.norm1.weight": one, P + "context_encoder.blocks.1.mlp.fc2.bias": one,
             "blocks.0.norm1.weight": one, "blocks.9.attn.qkv.weight": one, P + "context_encoder.norm.bias": one,
             P + "decoder.blocks.0.0.weight": one, "_ema": {"blocks.0.norm1.weight": one}}
    assert sorted(convert_data2vec2({"model": state})) == [
        "blocks.0.norm1.weight", "blocks.1.mlp.fc2.bias", "blocks.11.attn.qkv.weight", "blocks.2.norm1.weight",
        "norm_pre.bias"]
    assert layout_of({"model": state}) == Layout(prenet=2, main=10, finetuned=False)
    assert Layout(2, 10, False).describe() == "2 prenet + 10 main blocks" and Layout(2, 10, False).depth == 12
    assert Layout(0, 24, True).describe() == "24 blocks, fine-tuned"


def test_finetuned_keys_keep_fc_norm_and_head_beside_the_model():
    one = torch.zeros(1)
    state = {"model.blocks.0.norm1.weight": one, f"model.{P}context_encoder.blocks.0.norm1.weight": one,
             "fc_norm.weight": one, "fc_norm.bias": one, "head.weight": one, "head.bias": one}
    assert sorted(convert_data2vec2({"model": state})) == ["blocks.0.norm1.weight", "blocks.1.norm1.weight",
                                                            "fc_norm.bias", "fc_norm.weight", "head.bias",
                                                            "head.weight"]
    assert layout_of({"model": state}) == Layout(prenet=1, main=1, finetuned=True)
    with pytest.raises(UserError, match="both 'model.head.bias' and 'head.bias'"):
        convert_data2vec2({"model": {**state, "model.head.bias": one}})


# --- each release layout against the fairseq forward -------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "model."])
def test_vit_l_h_layout(tmp_path, images, prefix):
    """ViT-L/16, ViT-H/14: no prenet (here 3 blocks); decoder and EMA dropped, leftovers reported."""
    state = pretraining_state(depth=3)
    junk = {P + "decoder.blocks.0.0.weight": torch.randn(4), "decoder.proj.weight": torch.randn(4, 4),
            "shared_decoder.x": torch.randn(2), "recon_proj.weight": torch.randn(2)}
    leftover = {P + "alibi_scale": torch.randn(1)}
    torch.save({"model": {prefix + k: v for k, v in {**state, **junk, **leftover}.items()},
                "cfg": {"model": {"depth": 3}}}, tmp_path / "large.pt")
    backbone = fresh(3)
    report = load_checkpoint(backbone, tmp_path / "large.pt", "data2vec2")
    assert report.unexpected == [P + "alibi_scale"] and not report.missing and not report.dropped
    assert not report.pooling and backbone.fc_norm is None
    assert_same_function(backbone, state, images)


def test_vit_b_layout_with_prenet(tmp_path, images):
    """ViT-B/16 (``prenet_depth: 2``, ``depth: 10``), here 2 + 2: a 4-block backbone computes fairseq's encoder."""
    state = pretraining_state(depth=2, prenet=2)
    torch.save({"model": state}, tmp_path / "base.pt")
    backbone = fresh(4)
    report = load_checkpoint(backbone, tmp_path / "base.pt", "data2vec2")
    assert not (report.unexpected or report.missing or report.dropped)
    assert_same_function(backbone, state, images)


def test_finetuned_layout(tmp_path, images):
    """``*_imagenet_ft.pt``: model.* + fc_norm + head. The encoder loads; the head is dropped (reported); fc_norm
    becomes the backbone's pooling norm, and the ``mean_fc_norm`` feature is exactly what the head classifies."""
    state = finetuned_state(depth=2, prenet=2)
    torch.save({"model": state, "cfg": {"model": {"_name": "mae_image_classification"}}}, tmp_path / "ft.pt")
    backbone = fresh(4)
    report = load_checkpoint(backbone, tmp_path / "ft.pt", "data2vec2")
    assert report.dropped == ["head.bias", "head.weight"] and report.pooling == ["fc_norm.bias", "fc_norm.weight"]
    assert not (report.unexpected or report.missing)
    assert_same_function(backbone, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                         images)
    feature, logits = fairseq_classifier(state, images)
    with torch.no_grad():
        ours = pool(backbone(images).tokens, "mean_fc_norm", backbone.num_prefix_tokens, backbone.fc_norm)
    assert torch.allclose(ours, feature, atol=ATOL)
    assert torch.allclose(F.linear(ours, state["head.weight"], state["head.bias"]), logits, atol=1e-4)
    # never trained, whatever a stage unfreezes; not part of the timm ViT
    assert {"fc_norm.weight", "fc_norm.bias"} <= backbone.fixed_parameters()
    assert not any(p.requires_grad for p in backbone.fc_norm.parameters())
    assert not any(k.startswith("fc_norm") for k in backbone.vit.state_dict())

    # a pre-training file loaded next leaves no pooling norm behind
    torch.save({"model": pretraining_state(depth=2, prenet=2)}, tmp_path / "base.pt")
    assert not load_checkpoint(backbone, tmp_path / "base.pt", "data2vec2").pooling
    assert backbone.fc_norm is None and repr(backbone) == repr(fresh(4))     # as built (feature-cache keys)


def test_finetuned_file_with_pickled_config_needs_permission(tmp_path, images):
    state = finetuned_state(depth=2, prenet=0)
    torch.save({"model": state, "cfg": argparse.Namespace(depth=2)}, tmp_path / "ft.pt")
    with pytest.raises(UserError, match="ft.pt.*pickled.*argparse.Namespace"):
        load_checkpoint(fresh(2), tmp_path / "ft.pt", "data2vec2")
    backbone = fresh(2)
    load_checkpoint(backbone, tmp_path / "ft.pt", "data2vec2", allow_pickle=True)
    with torch.no_grad():
        ours = pool(backbone(images).tokens, "mean_fc_norm", 1, backbone.fc_norm)
    assert torch.allclose(ours, fairseq_classifier(state, images)[0], atol=ATOL)


# --- the depth comes from the file -------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 5])
def test_depth_mismatch_names_backbone_depth_and_both_numbers(tmp_path, depth):
    """The ViT-B layout (2 prenet + 2 main here) into a backbone of the main depth used to load with a warning and
    wrong outputs, and into a deeper one failed on missing keys; both now name backbone.depth."""
    torch.save({"model": pretraining_state(depth=2, prenet=2)}, tmp_path / "base.pt")
    with pytest.raises(UserError, match=rf"base.pt \(format 'data2vec2'\): the checkpoint holds 4 blocks \(2 prenet "
                                        rf"\+ 2 main blocks\) but .* backbone.depth = {depth}; set backbone.depth = 4"):
        load_checkpoint(fresh(depth), tmp_path / "base.pt", "data2vec2")


def test_depth_mismatch_in_a_recipe(tmp_path, tiny_recipe):
    """Through the recipe: backbone.depth = 2 with a 2 + 2 file is refused before anything runs."""
    from sslbench.core.registry import get_registry
    from sslbench.training.assembly import build_model
    from sslbench.training.recipe import resolve

    state = pretraining_state(depth=2, prenet=2)
    state[P + "fixed_positional_encoder.positions"] = torch.randn(1, 16, DIM)  # the tiny recipe: 16 px, 4-px patches
    torch.save({"model": state}, tmp_path / "base.pt")
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"].update(checkpoint=str(tmp_path / "base.pt"), checkpoint_format="data2vec2")
    registry = get_registry()
    with pytest.raises(UserError, match=r"holds 4 blocks \(2 prenet \+ 2 main blocks\).*backbone.depth = 2; "
                                        r"set backbone.depth = 4"):
        build_model(resolve(recipe, registry), registry)
    recipe["backbone"]["depth"] = 4
    backbone, report = build_model(resolve(recipe, registry), registry)
    assert backbone.depth == 4 and not report.unexpected


def test_other_formats_refuse_another_depth_too(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=0, **TINY)
    torch.save(vit.state_dict(), tmp_path / "three.pth")
    torch.manual_seed(0)
    with pytest.raises(UserError, match=r"three.pth \(format 'timm'\): the checkpoint holds 3 blocks but .*"
                                        r"backbone.depth = 2; set backbone.depth = 3"):
        load_checkpoint(build_backbone("vit_tiny_patch16_224", depth=2, **TINY), tmp_path / "three.pth", "timm")


def test_data2vec2_needs_its_architecture(tmp_path):
    torch.save({"model": pretraining_state()}, tmp_path / "d2v.pt")
    backbone = build_backbone("vit_tiny_patch16_224", depth=2, **TINY)
    with pytest.raises(UserError, match="d2v.pt.*data2vec2.*backbone.block = 'post_norm'"):
        load_checkpoint(backbone, tmp_path / "d2v.pt", "data2vec2")


def test_a_pooling_norm_of_the_wrong_width_is_refused(tmp_path):
    state = finetuned_state(depth=2, prenet=0)
    state["fc_norm.weight"] = torch.ones(DIM + 1)
    torch.save({"model": state}, tmp_path / "ft.pt")
    with pytest.raises(UserError, match=r"ft.pt.*pooling norm has shapes fc_norm.bias \(32,\), fc_norm.weight "
                                        r"\(33,\), expected \(32,\)"):
        load_checkpoint(fresh(2), tmp_path / "ft.pt", "data2vec2")


def test_reference_is_not_the_converter():
    """Guard on the test itself: the plain-torch forward distinguishes prenet order (swapping the two prenet blocks
    changes the output), so agreeing with it checks the numbering."""
    state = pretraining_state(depth=1, prenet=2)
    swapped = dict(state)
    for key in [k for k in state if k.startswith(P + "context_encoder.blocks.")]:
        i = int(key.split(".")[4])
        swapped[key.replace(f"blocks.{i}.", f"blocks.{1 - i}.", 1)] = state[key]
    images = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(fairseq_encoder(state, images)[-1], fairseq_encoder(swapped, images)[-1], atol=1e-3)
    assert math.isfinite(float(fairseq_encoder(state, images)[-1].sum()))


def test_sslbench_eval_of_a_finetuned_file_scores_its_feature_in_every_evaluator(tmp_path, tiny_recipe,
                                                                                   write_recipe):
    """End to end (``sslbench eval``): a fine-tuned file on the tiny recipe, every evaluator asking for
    ``mean_fc_norm``; the k-NN row equals k-NN on the feature fairseq's classifier computes from the file."""
    import pandas as pd

    from sslbench.cli import main
    from sslbench.core.registry import get_registry
    from sslbench.data.geometry import normalisation
    from sslbench.data.views import EvalTransform, to_float
    from sslbench.evaluation import knn
    from sslbench.training.assembly import load_datasets
    from sslbench.training.recipe import resolve

    state = finetuned_state(depth=1, prenet=1)                 # 1 prenet + 1 main: the tiny recipe's 2 blocks
    state[f"model.{P}fixed_positional_encoder.positions"] = 0.2 * torch.randn(1, 16, DIM)  # 16 px, 4-px patches
    torch.save({"model": state}, tmp_path / "ft.pt")
    recipe = copy.deepcopy(tiny_recipe)
    recipe["eval"] = [{"name": "knn", "k": [5], "token": "mean_fc_norm"},
                      {"name": "low_shot", "shots": [2], "fractions": [], "splits": 1, "token": "mean_fc_norm"},
                      {"name": "clustering", "n_init": 1, "token": "mean_fc_norm"},
                      {"name": "per_block", "k": [5], "norm": "raw", "token": "mean_fc_norm"},
                      {"name": "linear_probe", "n_last_blocks": [0], "avgpool": [True], "pool": "mean_fc_norm",
                       "epochs": 1, "lrs": [0.1]}]
    assert main(["eval", str(write_recipe(recipe)), "--checkpoint", str(tmp_path / "ft.pt"), "--format",
                 "data2vec2", "--name", "ft", "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "runs" / "ft" / "metrics.csv", keep_default_na=False)
    assert set(frame["evaluator"]) == {"knn", "low_shot", "clustering", "per_block", "linear_probe"}
    named = {e: set(v) for e, v in frame.groupby("evaluator")["variant"]}
    assert named["knn"] == {"k=5,b1.mean_fc_norm.normed"}
    assert named["low_shot"] == {"2shot,b1.mean_fc_norm.normed"}
    assert named["clustering"] == {"test,b1.mean_fc_norm.normed"}
    assert named["per_block"] == {"k=5,block=0,raw,mean_fc_norm", "k=5,block=1,raw,mean_fc_norm"}
    assert named["linear_probe"] == {"best,normed", "mean_fc_norm,normed"}

    # the k-NN row, recomputed from the feature fairseq's classifier computes on the same evaluation images
    registry = get_registry()
    resolved = resolve(recipe, registry)
    datasets = load_datasets(resolved, registry)
    mean, std = normalisation(resolved, 1)
    transform = EvalTransform(16, mean=mean, std=std)
    with torch.no_grad():
        features = {split: fairseq_classifier(state, transform(to_float(datasets[split].images)))[0]
                    for split in ("train", "test")}
    expected = knn(features["train"], datasets["train"].labels, features["test"], datasets["test"].labels, k=(5,))
    top1 = frame[(frame["evaluator"] == "knn") & (frame["metric"] == "top1")]["value"]
    assert float(top1.iloc[0]) == pytest.approx(expected["top1@k=5"], abs=1e-9)
