"""The views and masks of a fixed step are pinned bit for bit: sha256 of every output tensor, recorded with the
per-call-draw implementation before the views became sync-free (all draws made on the host in one place,
moved to the device once). Resume and N-process equality rest on these numbers not changing.

The pipelines are the shipped objectives' (``plugins/*.py`` views at 32 px, settings copied here so this test
does not depend on the plugins' import path), plus edge cases (no sample chosen, the central-crop fallback,
bilinear crops, float64 input). The masks are drawn from the same keyed streams after the views, as the
objectives' ``forward`` does, so the stream count the views consume is pinned too.

The hashes depend on torch's CPU kernels: after a torch upgrade, re-record with
``MKL_CBWR=COMPATIBLE python tests/test_view_identity.py --record`` on the unchanged code and check the diff touches
only this file's data.

They also depend on which code path MKL picks for the CPU it runs on: the vectorised math functions
torch hands to MKL round differently on an AVX-512 Intel core than on an AMD one, and 35 of the digests
changed between the two. Resume and N-process equality are properties of one machine; to pin the implementation
across machines the digests are computed in a child process with ``MKL_CBWR=COMPATIBLE``, MKL's CPU-independent
path (the variable is read when MKL loads, so it cannot be set in this already-running process).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslbench.core.masks import (block_mask, drop_mask_from_noise, keyed_seeds, random_replace_mask,
                                 random_unit_mask, split_mask_from_noise)
from sslbench.core.rng import KeyedRandom
from sslbench.data.views import (
    ColorJitter, Compose, GaussianBlur, Grayscale, HorizontalFlip, IndependentCrops, MultiCrop, Normalize,
    RandomResizedCrop, SharedCrop, Solarize, crop_flip, strong_photometric,
)

REFERENCE = Path(__file__).parent / "data" / "view_identity.json"


def pipelines() -> dict:
    """name → pipeline; the shipped objectives' views at 32 px (MIM-Refiner locals 16 px), then edge cases."""
    mae = IndependentCrops(1, Compose([*crop_flip(32, (0.2, 1.0)), Normalize()]))
    mae_ct = IndependentCrops(2, Compose([*crop_flip(32, (0.08, 1.0)), Normalize()]))
    teacher = Compose([*strong_photometric(blur_p=0.1, solarize_p=0.2), Normalize()])
    conmim = SharedCrop(Compose(crop_flip(32, (0.08, 1.0))), [Normalize(), teacher])
    globals_ = [Compose([RandomResizedCrop(32, (0.25, 1.0)), HorizontalFlip(0.5),
                         *strong_photometric(blur_p=1.0 if i % 2 == 0 else 0.1,
                                              solarize_p=0.0 if i % 2 == 0 else 0.2), Normalize()]) for i in range(2)]
    local = Compose([*crop_flip(16, (0.05, 0.25)), *strong_photometric(blur_p=0.5, solarize_p=0.0), Normalize()])
    mim_refiner = MultiCrop(2, globals_, 10, local)
    nothing_chosen = IndependentCrops(1, Compose([RandomResizedCrop(16, scale=(2.0, 3.0)), HorizontalFlip(0.0),
                                                  ColorJitter(p=0.0), Grayscale(0.0), GaussianBlur(0.0),
                                                  Solarize(0.0)]))
    everything = IndependentCrops(2, [Compose([RandomResizedCrop((12, 20), (0.1, 0.3), interpolation="bilinear"),
                                               HorizontalFlip(1.0), ColorJitter(0.9, 0.9, 0.9, 0.5, p=1.0),
                                               Grayscale(1.0), GaussianBlur(1.0, kernel_size=5), Solarize(1.0)]),
                                      Compose([RandomResizedCrop(8, (0.5, 1.0), ratio=(0.5, 2.0), tries=3),
                                               GaussianBlur(0.3, sigma=(0.5, 0.6))])])
    return {"mae": mae, "micl": mae, "mae_ct": mae_ct, "conmim": conmim, "mim_refiner": mim_refiner,
            "nothing_chosen": nothing_chosen, "everything": everything}


def batch(channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + channels)
    return torch.randint(0, 256, (8, channels, 32, 32), dtype=torch.uint8, generator=g)


def digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    head = f"{tuple(data.shape)}|{data.dtype}|".encode()
    return hashlib.sha256(head + data.view(torch.uint8).numpy().tobytes()).hexdigest()


def masks(rng: KeyedRandom) -> dict[str, str]:
    """The objectives' masks, drawn after the views from the same streams (MAE, MiCL, ConMIM's order)."""
    keep, masked, restore = drop_mask_from_noise(rng.rand(16), 0.75)
    split = split_mask_from_noise(rng.rand(16), 0.5, 2)
    seeds = keyed_seeds(rng.rand(2))                                     # ConMIM's block mode: a seed a sample
    block = block_mask(seeds, (4, 4), 6, min_block=4)
    units = random_unit_mask(rng.rand(4), (4, 4), 2, 3)                 # ConMIM's random_units mode
    replace = random_replace_mask(8, 16, 0.4, torch.Generator().manual_seed(seeds[0]))
    return {"drop.keep": digest(keep.keep), "drop.masked": digest(masked), "drop.restore": digest(restore),
            "split": digest(split.groups), "block": digest(block), "units": digest(units),
            "replace": digest(replace), "after": digest(rng.rand(3))}


def outputs() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, pipeline in pipelines().items():
        for channels in (1, 3):
            images = batch(channels)
            inputs = {"keyed": (images, KeyedRandom(7, 11, torch.arange(40, 48))),
                      "generator": (images, torch.Generator().manual_seed(5)),
                      "float64": (images.double() / 255, KeyedRandom(7, 12, torch.arange(40, 48)))}
            for source, (x, rng) in inputs.items():
                for v, view in enumerate(pipeline(x, rng)):
                    out[f"{name}/{channels}ch/{source}/view{v}"] = digest(view)
                if source == "keyed":
                    out.update({f"{name}/{channels}ch/mask/{k}": h for k, h in masks(rng).items()})
    return out


def outputs_in_a_child_with_mkl_pinned() -> dict[str, str]:
    child = subprocess.run([sys.executable, __file__, "--print"], env={**os.environ, "MKL_CBWR": "COMPATIBLE"},
                           capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


def test_views_and_masks_are_bit_identical_to_the_recorded_reference():
    reference = json.loads(REFERENCE.read_text())
    if reference["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"reference recorded with torch {reference['torch']}; re-record (see the module docstring)")
    now = outputs_in_a_child_with_mkl_pinned()
    assert now.keys() == reference["hashes"].keys()
    changed = [k for k, h in now.items() if reference["hashes"][k] != h]
    assert changed == []


def test_the_packed_one_copy_path_gives_the_same_views():
    # On the CPU the draws are already where the images are and are not copied; force the packed float32 copy.
    from sslbench.data.draws import to_device

    for name, pipeline in pipelines().items():
        x = batch(3).float() / 255
        direct = pipeline(x, KeyedRandom(7, 11, torch.arange(40, 48)))
        draws = to_device(pipeline.draw(tuple(x.shape), x.dtype, KeyedRandom(7, 11, torch.arange(40, 48))), "cpu",
                          copy=True)
        assert all(torch.equal(a, b) for a, b in zip(direct, pipeline.apply_draws(x, draws))), name


@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_built_without_reading_the_device(channels):
    """Sync-free: with the images on the ``meta`` device (shapes, no values), any host read of a device tensor
    — ``.item()``, ``bool()``, ``nonzero``, a boolean-mask index, a copy back to the CPU — raises. The draws
    are made from host streams and reach the device in one copy; everything after that must be tensor ops."""
    for name, pipeline in pipelines().items():
        views = pipeline(batch(channels).to("meta"), KeyedRandom(7, 11, torch.arange(40, 48)))
        assert all(v.device.type == "meta" for v in views), name
        assert len(views) == pipeline.num_views


if __name__ == "__main__":
    if sys.argv[1:] == ["--print"]:  # the child of the test above
        print(json.dumps(outputs()))
        sys.exit(0)
    if sys.argv[1:] != ["--record"] or os.environ.get("MKL_CBWR") != "COMPATIBLE":
        sys.exit("usage: MKL_CBWR=COMPATIBLE python tests/test_view_identity.py --record  (see the module docstring)")
    # re-record the reference (only on code whose outputs are known to be right)
    REFERENCE.write_text(json.dumps({"torch": torch.__version__, "hashes": outputs()}, indent=0, sort_keys=True))
    print(f"wrote {REFERENCE}", file=sys.stderr)
