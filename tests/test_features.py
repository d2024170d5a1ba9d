"""Feature extraction: equals a direct forward, one forward per batch, the cache hits and is never stale,
and 2-process extraction returns exactly the 1-process features."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslbench.core.backbone import build_backbone
from sslbench.data.dataset import ImageDataset
from sslbench.core.errors import UserError
from sslbench.evaluation.features import FeatureRequest, extract_features, weights_fingerprint
from sslbench.data.views import EvalTransform, to_float

DEPTH = 3
REQUESTS = [FeatureRequest(0, "cls", "raw"), FeatureRequest(1, "mean", "normed"),
            FeatureRequest(-1, "cls+mean", "normed"), FeatureRequest(0, "cls", "normed"),
            FeatureRequest(2, "mean", "raw")]


def tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=DEPTH,
                          num_heads=2)


def tiny_dataset(n: int = 11, seed: int = 0, fingerprint: str = "toy-v1") -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "toy", fingerprint)


def grey_transform(mean: float = 0.5) -> EvalTransform:
    return EvalTransform(16, mean=(mean,), std=(0.5,))


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone()


class ForwardCounter:
    """Counts the backbone's forward calls and the number of blocks each ran."""

    def __init__(self, backbone) -> None:
        self.calls = 0
        self.training_seen: set[bool] = set()
        self.handle = backbone.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls += 1
        self.training_seen.add(module.training)

    def remove(self) -> None:
        self.handle.remove()


def direct_features(backbone, dataset, request: FeatureRequest, mean: float = 0.5) -> torch.Tensor:
    """Independent reference: timm's own block loop on the whole dataset, pooled by hand."""
    vit = backbone.vit
    with torch.no_grad():
        x = grey_transform(mean)(to_float(dataset.images))
        x = vit._pos_embed(vit.patch_embed(x))
        x = vit.norm_pre(x)
        block = request.block % DEPTH
        for index in range(block + 1):
            x = vit.blocks[index](x)
        if request.norm == "normed":
            x = vit.norm(x)
    cls, mean_patch = x[:, 0], x[:, 1:].mean(1)
    return {"cls": cls, "mean": mean_patch, "cls+mean": torch.cat([cls, mean_patch], 1)}[request.token]


# --- requests and fingerprints -----------------------------------------------------------------------------------

def test_feature_request_str_parse_and_validation() -> None:
    r = FeatureRequest(11, "cls", "normed")
    assert str(r) == "b11.cls.normed" and FeatureRequest.parse("b11.cls.normed") == r
    assert FeatureRequest.parse(str(FeatureRequest(-1, "cls+mean", "raw"))) == FeatureRequest(-1, "cls+mean", "raw")
    assert FeatureRequest(-1).resolve(12) == FeatureRequest(11) and FeatureRequest(-12).resolve(12).block == 0
    assert sorted([FeatureRequest(2), FeatureRequest(10)], key=str)  # hashable, str-sortable (used by the runner)
    with pytest.raises(UserError, match="token must be one of"):
        FeatureRequest(0, "avg")
    with pytest.raises(UserError, match="norm must be one of"):
        FeatureRequest(0, "cls", "layernorm")
    with pytest.raises(UserError, match="expected b<block>"):
        FeatureRequest.parse("block11.cls")
    with pytest.raises(UserError, match="block must be in -12..11"):
        FeatureRequest(12).resolve(12)


def test_weights_fingerprint_matches_independent_hash_and_detects_changes() -> None:
    module = torch.nn.Linear(3, 2)
    expected = hashlib.sha256()
    for name in sorted(module.state_dict()):
        t = module.state_dict()[name]
        expected.update(name.encode() + f"|{tuple(t.shape)}|{t.dtype}|".encode() + t.numpy().tobytes())
    assert weights_fingerprint(module) == expected.hexdigest()

    same = copy.deepcopy(module)
    assert weights_fingerprint(same) == weights_fingerprint(module)
    with torch.no_grad():
        same.weight[0, 0] += 1e-6
    assert weights_fingerprint(same) != weights_fingerprint(module)
    assert weights_fingerprint(copy.deepcopy(module).to(torch.bfloat16)) != weights_fingerprint(module)


# --- extraction --------------------------------------------------------------------------------------------------

def test_features_equal_direct_forward_with_one_forward_per_batch(backbone) -> None:
    dataset = tiny_dataset()
    backbone.train()  # extraction must switch to eval mode and restore training mode afterwards
    counter = ForwardCounter(backbone)
    try:
        feats = extract_features(backbone, dataset, REQUESTS, transform=grey_transform(), batch_size=4,
                                 progress=False)
    finally:
        counter.remove()
    assert counter.calls == 3 and counter.training_seen == {False}  # ceil(11 / 4) batches, one forward each
    assert backbone.training
    backbone.eval()
    assert list(feats) == REQUESTS
    for request in REQUESTS:
        f = feats[request]
        width = 64 if request.token == "cls+mean" else 32
        assert f.shape == (11, width) and f.dtype == torch.float32 and f.device.type == "cpu"
        assert not f.is_inference()
        torch.testing.assert_close(f, direct_features(backbone, dataset, request), rtol=1e-5, atol=1e-5)
    # The last block's normed CLS is the encoder output that BackboneOutput.tokens holds.
    with torch.no_grad():
        tokens = backbone(grey_transform()(dataset.images)).tokens
    torch.testing.assert_close(feats[REQUESTS[2]][:, :32], tokens[:, 0], rtol=1e-5, atol=1e-5)


def test_per_batch_features_do_not_hold_the_block_outputs(backbone) -> None:
    """Each pooled feature owns just its (B, D) values: a view such as tokens[:, 0] would keep the whole
    (B, tokens, D) block output alive until extraction ends (OOM for per-block probes of a real dataset)."""
    from sslbench.evaluation.features import _forward_batch

    images = grey_transform()(to_float(tiny_dataset(4).images))
    requests = [r.resolve(len(backbone.vit.blocks)) for r in REQUESTS]
    with torch.inference_mode():
        pooled = _forward_batch(backbone, images, requests, backbone.vit.num_prefix_tokens)
    for request, features in zip(requests, pooled):
        assert features.untyped_storage().nbytes() == features.numel() * features.element_size(), request


def test_batch_size_does_not_change_features(backbone) -> None:
    dataset = tiny_dataset()
    a = extract_features(backbone, dataset, REQUESTS[:2], transform=grey_transform(), batch_size=3, progress=False)
    b = extract_features(backbone, dataset, REQUESTS[:2], transform=grey_transform(), batch_size=11, progress=False)
    for r in REQUESTS[:2]:
        torch.testing.assert_close(a[r], b[r], rtol=1e-5, atol=1e-6)


def test_cache_hit_skips_forwards_and_partial_hit_computes_only_missing(backbone, tmp_path: Path) -> None:
    dataset, cache = tiny_dataset(), tmp_path / "cache"
    kwargs = dict(transform=grey_transform(), batch_size=4, cache_dir=cache, progress=False)
    first = extract_features(backbone, dataset, REQUESTS, **kwargs)
    assert len(list(cache.glob("*.pt"))) == len(REQUESTS)
    assert not list(cache.glob(".tmp-*"))

    counter = ForwardCounter(backbone)
    try:
        second = extract_features(backbone, dataset, REQUESTS, **kwargs)
        assert counter.calls == 0
        # -1 and 2 name the same block: served from the same cache file.
        alias = extract_features(backbone, dataset, [FeatureRequest(2, "cls+mean", "normed")], **kwargs)
        assert counter.calls == 0
        torch.testing.assert_close(alias[FeatureRequest(2, "cls+mean", "normed")], first[REQUESTS[2]])
        # One new request: forwards run again, but only it is added to the cache.
        extra = FeatureRequest(1, "cls", "raw")
        mixed = extract_features(backbone, dataset, [REQUESTS[0], extra], **kwargs)
        assert counter.calls == 3
    finally:
        counter.remove()
    for r in REQUESTS:
        assert torch.equal(first[r], second[r])
    torch.testing.assert_close(mixed[extra], direct_features(backbone, dataset, extra), rtol=1e-5, atol=1e-5)
    assert len(list(cache.glob("*.pt"))) == len(REQUESTS) + 1


def _cached_call(backbone, dataset, transform, request, cache, counter) -> tuple[torch.Tensor, int]:
    before = counter.calls
    out = extract_features(backbone, dataset, [request], transform=transform, batch_size=11, cache_dir=cache,
                           progress=False)[request]
    return out, counter.calls - before


def test_cache_is_never_stale(tmp_path: Path) -> None:
    cache, request = tmp_path / "cache", FeatureRequest(-1, "cls", "normed")
    backbone, dataset = tiny_backbone(), tiny_dataset()
    counter = ForwardCounter(backbone)
    base, calls = _cached_call(backbone, dataset, grey_transform(), request, cache, counter)
    assert calls == 1
    assert _cached_call(backbone, dataset, grey_transform(), request, cache, counter)[1] == 0

    # Changed weights (in place, same module object): recomputed, and equal to the fresh direct forward.
    with torch.no_grad():
        backbone.vit.blocks[1].mlp.fc2.bias.add_(0.1)
    changed, calls = _cached_call(backbone, dataset, grey_transform(), request, cache, counter)
    assert calls == 1 and not torch.allclose(changed, base)
    torch.testing.assert_close(changed, direct_features(backbone, dataset, request), rtol=1e-5, atol=1e-5)

    # Changed dataset: a new fingerprint (as ImageDataset content changes give) is never served the old features.
    other_data = tiny_dataset(seed=1, fingerprint="toy-v2")
    feats, calls = _cached_call(backbone, other_data, grey_transform(), request, cache, counter)
    assert calls == 1
    torch.testing.assert_close(feats, direct_features(backbone, other_data, request), rtol=1e-5, atol=1e-5)

    # Changed transform (normalisation mean): recomputed.
    feats, calls = _cached_call(backbone, dataset, grey_transform(mean=0.3), request, cache, counter)
    assert calls == 1
    torch.testing.assert_close(feats, direct_features(backbone, dataset, request, mean=0.3), rtol=1e-5, atol=1e-5)

    # Changed layer / token / stream: recomputed.
    for other in (FeatureRequest(0, "cls", "normed"), FeatureRequest(-1, "mean", "normed"),
                  FeatureRequest(-1, "cls", "raw")):
        feats, calls = _cached_call(backbone, dataset, grey_transform(), other, cache, counter)
        assert calls == 1
        torch.testing.assert_close(feats, direct_features(backbone, dataset, other), rtol=1e-5, atol=1e-5)

    # Same weights, different number of attention heads: a different function, so a different key.
    torch.manual_seed(0)
    four_heads = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                                depth=DEPTH, num_heads=4)
    four_heads.load_state_dict(backbone.state_dict())
    assert weights_fingerprint(four_heads) == weights_fingerprint(backbone)
    counter4 = ForwardCounter(four_heads)
    _, calls = _cached_call(four_heads, dataset, grey_transform(), request, cache, counter4)
    assert calls == 1
    counter.remove()
    counter4.remove()


def test_cache_file_with_foreign_key_is_a_miss(backbone, tmp_path: Path) -> None:
    """A file at the right path holding another key (a hash collision) or garbage is recomputed, not trusted."""
    cache, dataset, request = tmp_path / "cache", tiny_dataset(), FeatureRequest(0, "mean", "raw")
    kwargs = dict(transform=grey_transform(), batch_size=11, cache_dir=cache, progress=False)
    truth = extract_features(backbone, dataset, [request], **kwargs)[request]
    (path,) = cache.glob("*.pt")
    stored = torch.load(path)
    torch.save({"key": stored["key"].replace("toy-v1", "someone-else"), "features": torch.zeros_like(truth)}, path)
    counter = ForwardCounter(backbone)
    try:
        again = extract_features(backbone, dataset, [request], **kwargs)[request]
        assert counter.calls == 1 and torch.equal(again, truth)
        path.write_bytes(b"not a torch file")
        assert torch.equal(extract_features(backbone, dataset, [request], **kwargs)[request], truth)
        assert counter.calls == 2
    finally:
        counter.remove()


def _extract_elsewhere_under_the_lock(lock: str, ready: str, source: str, cache: str) -> None:
    """Stand-in for a concurrent evaluation: holds the extraction lock, then 'finishes' by writing the cache files
    (copies of an earlier extraction) and lets go. Only file I/O, so it is safe in a forked child."""
    import shutil
    import time

    from sslbench.core.io import file_lock

    with file_lock(lock):
        Path(ready).touch()
        time.sleep(0.5)
        for path in Path(source).glob("*.pt"):
            shutil.copy(path, Path(cache) / path.name)


def test_a_concurrent_extraction_of_the_same_features_is_waited_for(backbone, tmp_path: Path, capsys) -> None:
    """Two evaluations of one checkpoint started together: the second waits for the first's cache files instead of
    running the same forward passes (without the lock it would find no cache and extract again)."""
    import multiprocessing
    import time

    from sslbench.evaluation.cache import cache_source, lock_path

    dataset, request, transform = tiny_dataset(), FeatureRequest(-1, "cls", "normed"), grey_transform()
    source, cache = tmp_path / "earlier", tmp_path / "cache"
    truth = extract_features(backbone, dataset, [request], transform=transform, cache_dir=source,
                             progress=False)[request]
    cache.mkdir()
    lock = lock_path(cache, cache_source(backbone, dataset, transform))
    ready = tmp_path / "ready"
    other = multiprocessing.get_context("fork").Process(
        target=_extract_elsewhere_under_the_lock, args=(str(lock), str(ready), str(source), str(cache)))
    other.start()
    while not ready.exists():
        time.sleep(0.01)
    counter = ForwardCounter(backbone)
    try:
        got = extract_features(backbone, dataset, [request], transform=transform, cache_dir=cache,
                               progress=False)[request]
    finally:
        counter.remove()
        other.join()
    assert other.exitcode == 0
    assert counter.calls == 0 and torch.equal(got, truth)
    assert "another process is extracting features of this checkpoint" in capsys.readouterr().err


def test_empty_requests_and_bad_block(backbone) -> None:
    assert extract_features(backbone, tiny_dataset(), [], transform=grey_transform()) == {}
    with pytest.raises(UserError, match="block must be in"):
        extract_features(backbone, tiny_dataset(), [FeatureRequest(DEPTH)], transform=grey_transform(),
                         progress=False)


# --- distributed -------------------------------------------------------------------------------------------------

_DISTRIBUTED_SCRIPT = """
import sys, torch
from accelerate import Accelerator
sys.path.insert(0, {tests_dir!r})
from test_features import REQUESTS, tiny_backbone, tiny_dataset, grey_transform, ForwardCounter
from sslbench.evaluation.features import extract_features

torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
backbone = tiny_backbone()
dataset = tiny_dataset()
kwargs = dict(transform=grey_transform(), batch_size=2, accelerator=accelerator, cache_dir={cache!r},
              progress=False)
feats = extract_features(backbone, dataset, REQUESTS, **kwargs)
counter = ForwardCounter(backbone)
cached = extract_features(backbone, dataset, REQUESTS, **kwargs)  # second call: every process hits the cache
assert counter.calls == 0, counter.calls
for r in REQUESTS:
    assert torch.equal(feats[r], cached[r])
torch.save({{"world": accelerator.num_processes, "features": {{str(r): f for r, f in feats.items()}}}},
           {out!r}.format(accelerator.process_index))
# A clean shutdown: exiting with a live gloo group can abort in its destructor while the peer still talks to it.
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_two_process_extraction_equals_one_process(backbone, tmp_path: Path) -> None:
    script = tmp_path / "extract.py"
    out = str(tmp_path / "features-rank{}.pt")
    script.write_text(_DISTRIBUTED_SCRIPT.format(tests_dir=str(Path(__file__).parent), cache=str(tmp_path / "cache"),
                                                 out=out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    # --standalone: a local rendezvous on a free port, so parallel test runs cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun forwards it to its workers (each in a session of its own) and reaps them;
        # a SIGKILL would orphan the workers.
        proc.terminate()
        try:
            proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    assert proc.returncode == 0, stderr[:3000] + "\n...\n" + stderr[-2000:]

    # 11 samples over 2 processes: shards of 5 and 6, batch 2 — uneven shards and a short last batch.
    single = extract_features(backbone, tiny_dataset(), REQUESTS, transform=grey_transform(), batch_size=2,
                              progress=False)
    for rank in (0, 1):  # every process returns the full, ordered result
        saved = torch.load(out.format(rank))
        gathered = saved["features"]
        assert saved["world"] == 2
        for r in REQUESTS:
            torch.testing.assert_close(gathered[str(r)], single[r], rtol=1e-6, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(REQUESTS)
