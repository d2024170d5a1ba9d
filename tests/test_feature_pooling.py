"""The ``mean_fc_norm`` feature (data2vec 2.0's): the patch mean through the checkpoint's pooling LayerNorm, or a
LayerNorm without parameters when the backbone has none — on hand-computed tokens, through the extraction and its
cache (a loaded fc_norm is part of the weights, so it can never be served stale features)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslbench.evaluation.features import FeatureRequest, extract_features, pool, weights_fingerprint

from .test_features import direct_features, grey_transform, tiny_backbone, tiny_dataset

# CLS (9, 9) and two patch tokens whose mean is (2, 4): centred (-1, 1), variance 1
TOKENS = torch.tensor([[[9.0, 9.0], [1.0, 3.0], [3.0, 5.0]]])


def test_pool_by_hand():
    assert torch.equal(pool(TOKENS, "cls", 1), torch.tensor([[9.0, 9.0]]))
    assert torch.equal(pool(TOKENS, "mean", 1), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(pool(TOKENS, "cls+mean", 1), torch.tensor([[9.0, 9.0, 2.0, 4.0]]))
    unit = 1 / math.sqrt(1 + 1e-6)                       # no fc_norm: a LayerNorm without parameters, eps 1e-6
    assert torch.allclose(pool(TOKENS, "mean_fc_norm", 1), torch.tensor([[-unit, unit]]), atol=1e-7)
    fc_norm = nn.LayerNorm(2, eps=1e-6)
    with torch.no_grad():
        fc_norm.weight.copy_(torch.tensor([2.0, 1.0]))
        fc_norm.bias.copy_(torch.tensor([0.5, 0.0]))
    assert torch.allclose(pool(TOKENS, "mean_fc_norm", 1, fc_norm), torch.tensor([[0.5 - 2 * unit, unit]]),
                          atol=1e-6)
    # two prefix tokens (CLS + a register): only the patch tokens are averaged
    assert torch.equal(pool(TOKENS, "mean", 2), torch.tensor([[3.0, 5.0]]))


def _fc_norm(width: int, seed: int) -> nn.LayerNorm:
    g = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(width, generator=g))
        norm.bias.copy_(0.5 * torch.randn(width, generator=g))
    return norm.requires_grad_(False)


def test_extraction_uses_the_backbones_fc_norm_and_the_cache_follows_it(tmp_path):
    backbone, dataset = tiny_backbone(), tiny_dataset()
    request = FeatureRequest(-1, "mean_fc_norm", "normed")
    kwargs = dict(transform=grey_transform(), batch_size=4, cache_dir=tmp_path, progress=False)
    mean = direct_features(backbone, dataset, FeatureRequest(-1, "mean", "normed"))

    plain = extract_features(backbone, dataset, [request], **kwargs)[request]
    assert torch.allclose(plain, nn.functional.layer_norm(mean, mean.shape[-1:], eps=1e-6), atol=1e-5)

    without = weights_fingerprint(backbone)
    backbone.fc_norm = _fc_norm(backbone.embed_dim, seed=1)
    assert weights_fingerprint(backbone) != without           # the pooling norm is part of the cache key
    normed = extract_features(backbone, dataset, [request], **kwargs)[request]
    assert torch.allclose(normed, backbone.fc_norm(mean), atol=1e-5)
    assert not torch.allclose(normed, plain, atol=1e-3)      # not served the cached parameter-free features

    backbone.fc_norm = _fc_norm(backbone.embed_dim, seed=2)   # another fine-tuned file: another key again
    again = extract_features(backbone, dataset, [request], **kwargs)[request]
    assert torch.allclose(again, backbone.fc_norm(mean), atol=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_mean_fc_norm_is_one_forward_with_the_other_requests(tmp_path):
    backbone, dataset = tiny_backbone(), tiny_dataset()
    backbone.fc_norm = _fc_norm(backbone.embed_dim, seed=3)
    requests = [FeatureRequest(-1, "cls", "normed"), FeatureRequest(1, "mean_fc_norm", "raw")]
    calls = []
    handle = backbone.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = extract_features(backbone, dataset, requests, transform=grey_transform(), batch_size=len(dataset),
                               progress=False)
    finally:
        handle.remove()
    assert len(calls) == 1
    mean = direct_features(backbone, dataset, FeatureRequest(1, "mean", "raw"))
    assert torch.allclose(out[requests[1]], backbone.fc_norm(mean), atol=1e-5)
    assert out[requests[1]].dtype == torch.float32 and out[requests[1]].shape == (len(dataset), backbone.embed_dim)


@pytest.mark.parametrize("fc_norm", [None, _fc_norm(8, seed=4)])
def test_under_autocast_the_feature_is_computed_in_float32(fc_norm):
    """float32 tokens under a bf16 autocast give the float32 feature (CPU autocast would run a LayerNorm in bf16);
    bf16 tokens differ only by their own rounding."""
    torch.manual_seed(0)
    tokens = torch.randn(4, 5, 8)
    exact = pool(tokens, "mean_fc_norm", 1, fc_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = pool(tokens, "mean_fc_norm", 1, fc_norm)
        rounded = pool(tokens.bfloat16(), "mean_fc_norm", 1, fc_norm)
    assert same.dtype == rounded.dtype == torch.float32
    assert torch.allclose(same, exact, atol=1e-6, rtol=0)
    assert torch.allclose(rounded, exact, atol=0.05)
