"""Every registered evaluator, with its default options, on the features of a tiny BEiT: the features it requests
(any block, CLS / patch mean, raw / normed) are extracted through the BEiT forward and score above chance on digits.

Parametrised over the registry, as tests/evaluators/test_registered.py, but through a real backbone and extraction.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.core.evaluator import Split
from sslbench.data.dataset import ImageDataset
from sslbench.data.views import EvalTransform
from sslbench.evaluation.features import extract_features

from .test_registered import EVALUATORS, REGISTRY, build

DEPTH = 4


@pytest.fixture(scope="module")
def beit():
    torch.manual_seed(0)
    return build_backbone("beit_base_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=DEPTH,
                          num_heads=2, model_args={"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
                                                   "use_abs_pos_emb": False, "init_values": 0.1})


@pytest.fixture(scope="module")
def digits():
    source = REGISTRY.get("dataset", "digits").factory

    def part(split: str, n: int) -> ImageDataset:
        full = source.load(split=split, size=16)
        return ImageDataset(full.images[:n], full.labels[:n], full.classes, full.name, f"{full.fingerprint}[:{n}]")

    return part("train", 400), part("test", 150)


@pytest.mark.parametrize("name", EVALUATORS)
def test_evaluator_runs_on_beit_features(name, beit, digits):
    train_set, test_set = digits
    evaluator = build(name)
    requests = evaluator.requests(DEPTH)
    transform = EvalTransform(16, mean=(0.5,), std=(0.5,))
    features = [extract_features(beit, data, requests, transform=transform, batch_size=128, progress=False)
                for data in digits]
    for request in requests:
        width = 64 if request.token == "cls+mean" else 32
        assert features[0][request].shape == (len(train_set), width)
        assert torch.isfinite(features[0][request]).all()
    rows = evaluator.evaluate(Split(features[0], train_set.labels), Split(features[1], test_set.labels), requests)
    assert rows and all(math.isfinite(r.value) for r in rows)
    top1 = [r.value for r in rows if r.metric == "top1" and "1shot" not in r.variant]
    if name in ("knn", "linear_probe", "per_block"):
        # random BEiT features of digits are far from chance (10%)
        assert max(top1) > 30, top1
