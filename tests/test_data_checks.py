"""Data sources are checked before the model is built, and a Hub dataset that cannot be had fails at once with one
line naming the dataset, the likely cause and the local alternative (`sslbench/data/hub.py`)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from huggingface_hub import errors

from sslbench.core.errors import UserError
from sslbench.data.hub import check_hub_dataset


def _hub_error(cls, message: str) -> Exception:
    """An instance of one of huggingface_hub's error classes without an HTTP response (whose type depends on the
    HTTP client the installed huggingface_hub uses)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


class ConnectError(Exception):
    """What httpx (huggingface_hub's client) raises when a host cannot be reached; recognised by name."""


class FakeHub:
    """Answers ``dataset_info`` / ``auth_check`` as the Hub would for one case; records the calls."""

    def __init__(self, info=None, raises=None, auth_raises=None):
        self.info, self.raises, self.auth_raises, self.calls = info, raises, auth_raises, []

    def dataset_info(self, repo_id, timeout=None):
        self.calls.append(("dataset_info", repo_id, timeout))
        if self.raises is not None:
            raise self.raises
        return self.info

    def auth_check(self, repo_id, repo_type=None):
        self.calls.append(("auth_check", repo_id, repo_type))
        if self.auth_raises is not None:
            raise self.auth_raises


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_unreachable_hub_names_the_dataset_the_cause_and_the_alternatives(online):
    hub = FakeHub(raises=ConnectError("[Errno -2] Name or service not known"))
    with pytest.raises(UserError) as info:
        check_hub_dataset("ILSVRC/imagenet-1k", "data.train", api=hub)
    text = str(info.value)
    assert text.startswith("data.train: Hugging Face dataset 'ILSVRC/imagenet-1k': cannot reach the Hugging Face Hub")
    assert "HF_HUB_OFFLINE=1" in text and 'source = "imagefolder"' in text
    assert hub.calls == [("dataset_info", "ILSVRC/imagenet-1k", 10.0)]


def test_missing_dataset_says_not_found_and_how_to_log_in(online):
    hub = FakeHub(raises=_hub_error(errors.RepositoryNotFoundError, "404"))
    with pytest.raises(UserError, match="'nobody/nothing' was not found on the Hub .*HF_TOKEN"):
        check_hub_dataset("nobody/nothing", "data.test", api=hub)


def test_gated_dataset_without_a_token_says_where_to_accept_the_terms(online, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))                 # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = FakeHub(info=SimpleNamespace(gated="manual"))
    with pytest.raises(UserError) as info:
        check_hub_dataset("ILSVRC/imagenet-1k", "data.train", api=hub)
    text = str(info.value)
    assert "is gated (no Hugging Face token is set)" in text
    assert "https://huggingface.co/datasets/ILSVRC/imagenet-1k" in text and "hf auth login" in text
    assert [c[0] for c in hub.calls] == ["dataset_info"]


def test_gated_dataset_with_a_token_but_no_access(online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    hub = FakeHub(info=SimpleNamespace(gated="manual"),
                  auth_raises=_hub_error(errors.GatedRepoError, "403"))
    with pytest.raises(UserError, match="not been granted access"):
        check_hub_dataset("ILSVRC/imagenet-1k", "data.train", api=hub)
    assert hub.calls[-1] == ("auth_check", "ILSVRC/imagenet-1k", "dataset")


def test_a_reachable_open_dataset_passes(online):
    hub = FakeHub(info=SimpleNamespace(gated=False))
    check_hub_dataset("uoft-cs/cifar10", "data.train", api=hub)
    assert len(hub.calls) == 1


def test_local_paths_and_offline_mode_are_not_sent_to_the_hub(tmp_path, monkeypatch, online):
    hub = FakeHub(raises=AssertionError("must not be called"))
    check_hub_dataset(str(tmp_path), "data.train", api=hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_dataset("ILSVRC/imagenet-1k", "data.train", api=hub)
    assert hub.calls == []


def _hub_recipe(tiny_recipe, path="ILSVRC/imagenet-1k"):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"] = {"model": "vit_huge_patch14_224"}       # 632M parameters: must not be built
    recipe["data"]["train"] = {"source": "hf", "path": path, "split": "train"}
    return recipe


def test_a_run_on_an_unreachable_hub_dataset_fails_before_the_model_is_built(tiny_recipe, write_recipe, tmp_path,
                                                                            refused, monkeypatch, online):
    """On this machine the hub cannot be reached; elsewhere the same dataset is gated. Either way: one line naming
    the dataset and the local alternative, and no model built, nothing written."""
    import sslbench.training.context as context

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data source was checked")

    monkeypatch.setattr(context, "build_model", no_model)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = refused(["run", write_recipe(_hub_recipe(tiny_recipe)), "--no-progress"])
    assert "data.train: Hugging Face dataset 'ILSVRC/imagenet-1k'" in line and 'source = "imagefolder"' in line
    assert "cannot reach the Hugging Face Hub" in line or "is gated" in line
    assert not (tmp_path / "runs").exists()


def test_offline_mode_without_the_dataset_in_the_cache(tiny_recipe, write_recipe, tmp_path, refused, monkeypatch):
    import sslbench.training.context as context

    monkeypatch.setattr(context, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = refused(["run", write_recipe(_hub_recipe(tiny_recipe)), "--no-progress"])
    assert "is not in the Hugging Face cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set" in line
    assert "unset it to download" in line and 'source = "imagefolder"' in line


@pytest.mark.parametrize("source,expected", [("imagefolder", "data.train.path: no such file or folder"),
                                             ("disk", "data.train.path: no such file or folder"),
                                             ("parquet", "data.train.path: no parquet file matches")])
def test_missing_local_data_fails_before_the_model_is_built(source, expected, tiny_recipe, write_recipe, tmp_path,
                                                            refused, monkeypatch):
    import sslbench.training.context as context

    monkeypatch.setattr(context, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    recipe = copy.deepcopy(tiny_recipe)
    recipe["data"]["train"] = {"source": source, "path": str(tmp_path / "nowhere" / "*.parquet")}
    line = refused(["run", write_recipe(recipe), "--no-progress"])
    assert expected in line and str(tmp_path / "nowhere") in line


def test_missing_checkpoint_says_where_to_get_it_and_how_to_go_on(refused, tmp_path, monkeypatch):
    """The flagship recipe on a machine without its weights (run from an empty folder, so the relative path is
    missing wherever the tests run)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mimrefiner_vitl.toml"
    monkeypatch.chdir(tmp_path)
    line = refused(["run", recipe])
    assert "backbone.checkpoint: file not found: checkpoints/mae_pretrain_vit_large.pth" in line
    assert "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth" in line
    assert f"sslbench check {recipe} --allow-missing-files" in line and "--dry-run" in line
    assert not (tmp_path / "runs").exists()
