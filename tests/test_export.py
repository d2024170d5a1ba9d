"""`sslbench export`: a backbone as a folder plain timm loads, the same network to the last bit; its model card; the
refusals; and the Hub push up to the upload."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslbench.cli import main
from sslbench.commands.export import export_model
from sslbench.core.backbone import build_backbone
from sslbench.core.errors import UserError

from .conftest import TINY_RECIPE, dump_recipe

ARCH = "vit_tiny_patch16_224"
SIZES = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def backbone_recipe(pos_embed: str = "sincos") -> dict:
    return {"model": ARCH, **SIZES, "pos_embed": pos_embed, "checkpoint": None, "checkpoint_format": "timm",
            "checkpoint_trusted": False}


def random_backbone(pos_embed: str, seed: int, **extra):
    """A tiny backbone whose every trainable weight is random (not timm's init: biases and norms too)."""
    torch.manual_seed(seed)
    backbone = build_backbone(ARCH, **SIZES, pos_embed=pos_embed, **extra)
    with torch.no_grad():
        for param in backbone.vit.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.2)
    return backbone.eval()


def save_sslbench(path: Path, backbone, ema=None, recipe: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "sslbench", "backbone": backbone.vit.state_dict(),
                "ema": ema.vit.state_dict() if ema is not None else None, "recipe_hash": "feedbeef",
                "backbone_recipe": recipe or backbone_recipe(backbone.architecture["pos_embed"])}, path)
    return path


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(7))


def features(backbone, x) -> torch.Tensor:
    with torch.no_grad():
        return backbone(x).tokens


def timm_features(folder: Path, x) -> torch.Tensor:
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return model.forward_features(x)


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- plain timm, in a process that never imports sslbench ------------------------------------------------------
_PLAIN = """
import json, sys
import timm, torch
assert "sslbench" not in sys.modules
out = {}
for folder, inputs, expected in json.loads(sys.argv[1]):
    # a folder, or a repository in the Hub cache as `hf download` (or timm itself) leaves it, read offline
    name = folder if folder.startswith("hf-hub:") else "local-dir:" + folder
    model = timm.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        got = model.forward_features(torch.load(inputs))
    out[folder] = [float((got - torch.load(expected)).abs().max()), list(got.shape),
                   timm.data.resolve_data_config({}, model=model)["input_size"]]
assert "sslbench" not in sys.modules
print(json.dumps(out))
"""


def test_plain_timm_gives_sslbench_features(tmp_path):
    """Learned and sin-cos position embeddings, raw and EMA weights: each export, loaded by plain timm in a process
    without sslbench (from its folder, and once from the Hub's cache layout as hf-hub:REPO), gives its own source's
    features; raw and EMA differ."""
    x = images()
    torch.save(x, tmp_path / "x.pt")
    raw, ema = random_backbone("sincos", 0), random_backbone("sincos", 1)
    learned = random_backbone("learned", 2)
    sincos_file = save_sslbench(tmp_path / "a" / "backbone.pt", raw, ema=ema)
    learned_file = save_sslbench(tmp_path / "b" / "backbone.pt", learned)
    jobs = []
    for name, source, weights, backbone in (("sincos-raw", sincos_file, None, raw),
                                            ("sincos-ema", sincos_file, "ema", ema),
                                            ("learned", learned_file, "raw", learned)):
        folder = export_model(str(source), str(tmp_path / "out" / name), weights=weights)
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        torch.save(features(backbone, x), tmp_path / f"{name}.pt")
        jobs.append([str(folder), str(tmp_path / "x.pt"), str(tmp_path / f"{name}.pt")])
    # the sin-cos EMA export as if pushed to someone/tiny-vit and downloaded: the Hub cache layout, read offline
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(jobs[1][0], repo / "snapshots" / commit)
    jobs.append(["hf-hub:someone/tiny-vit", jobs[1][1], jobs[1][2]])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    proc = subprocess.run([sys.executable, "-c", _PLAIN, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for folder, _, _ in jobs:
        diff, shape, input_size = result[folder]
        assert diff <= 1e-5 and shape == [3, 1 + 64, 32] and input_size == [1, 32, 32], (folder, diff)
    assert not torch.allclose(torch.load(tmp_path / "sincos-raw.pt"), torch.load(tmp_path / "sincos-ema.pt"))
    assert not torch.equal(raw.vit.pos_embed, learned.vit.pos_embed)


def test_config_is_timm_hub_layout(tmp_path):
    from dataclasses import fields

    from timm.models import PretrainedCfg

    source = save_sslbench(tmp_path / "backbone.pt", random_backbone("sincos", 0))
    folder = export_model(str(source), str(tmp_path / "out"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 0
    assert config["model_args"] == SIZES             # exactly the sizes that differ from vit_tiny's defaults
    cfg = config["pretrained_cfg"]
    assert set(cfg) <= {f.name for f in fields(PretrainedCfg)}   # timm builds a PretrainedCfg from it
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.5] and cfg["std"] == [0.5]
    assert cfg["num_classes"] == 0 and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert config["sslbench"]["weights"] == "raw" and config["sslbench"]["recipe_hash"] == "feedbeef"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: other\ntags:\n- image-feature-extraction\n- timm\n"
                           "- sslbench\n---\n")
    assert "local-dir:" in card and "`raw`" in card and "no metrics.csv" in card


def test_default_model_args_are_left_out(tmp_path):
    """A backbone at the architecture's own sizes needs no model_args but its deviations (none here)."""
    from sslbench.core.timm_export import model_args

    backbone = build_backbone("vit_tiny_patch16_224", pos_embed="sincos")
    assert model_args(backbone.vit, "vit_tiny_patch16_224") == {}
    assert model_args(random_backbone("learned", 0).vit, ARCH) == SIZES


# --- a real run folder ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step MAE run with an EMA, evaluated by k-NN on its raw weights and on its EMA."""
    from sslbench.training.run import run_recipe

    root = tmp_path_factory.mktemp("run")
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["run"]["output_dir"] = str(root / "runs")
    recipe["stages"][0]["ema_momentum"] = 0.9
    recipe["eval"] = [{"name": "knn", "k": [5, 10]}, {"name": "knn", "k": [5], "use_ema": True}]
    path = root / "tiny.toml"
    path.write_text(dump_recipe(recipe))
    old = os.environ.get("SSLBENCH_CACHE"), os.environ.get("SSLBENCH_PROGRESS")
    os.environ["SSLBENCH_CACHE"], os.environ["SSLBENCH_PROGRESS"] = str(root / "cache"), "0"
    try:
        run_dir = run_recipe(str(path))
    finally:
        for key, value in zip(("SSLBENCH_CACHE", "SSLBENCH_PROGRESS"), old):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return run_dir, path


def _knn_top1(run_dir: Path, ema: bool) -> set[str]:
    """The run's k-NN top-1 values (percent, as the card prints them) of its raw or its EMA weights."""
    from sslbench.results.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.csv")
    rows = rows[(rows.evaluator == "knn") & (rows.metric == "top1") & (rows.checkpoint.str.endswith("(ema)") == ema)]
    return {f"| {value:.2f}% |" for value in rows.value}


def test_run_folder_through_the_cli(tiny_run, tmp_path, capsys):
    """`sslbench export RUN --to DIR`: the run's backbone, its recipe's normalisation, its headline results with
    their intervals in the card; --weights ema gives the EMA and the EMA's results."""
    from sslbench.core.checkpoints import load_checkpoint

    run_dir, _ = tiny_run
    x = images(size=16)
    for weights, fmt in (("raw", "sslbench"), ("ema", "sslbench_ema")):
        out = tmp_path / weights
        assert main(["export", str(run_dir), "--to", str(out), "--weights", weights]) == 0
        assert f"local-dir:{out}" in capsys.readouterr().out
        reference = build_backbone(ARCH, **{**SIZES, "img_size": 16}, pos_embed="sincos").eval()
        load_checkpoint(reference, run_dir / "checkpoints" / "backbone.pt", fmt)
        assert (timm_features(out, x) - features(reference, x)).abs().max() <= 1e-5
        card = (out / "README.md").read_text()
        assert any(v in card for v in _knn_top1(run_dir, ema=weights == "ema")) and "Clopper-Pearson" in card
        assert "`mae`" in card and json.loads((out / "config.json").read_text())["sslbench"]["weights"] == weights
        assert "Trained with sslbench" in card and "- **Seed:** 0" in card
    raw_card = (tmp_path / "raw" / "README.md").read_text()
    assert not any(v in raw_card for v in _knn_top1(run_dir, ema=True) - _knn_top1(run_dir, ema=False))


def test_checkpoint_inside_a_run_uses_the_run(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    folder = export_model(str(run_dir / "checkpoints" / "backbone.pt"), str(tmp_path / "out"))
    assert any(v in (folder / "README.md").read_text() for v in _knn_top1(run_dir, ema=False))


def test_timm_checkpoint_with_recipe(tmp_path, write_recipe, capsys):
    """A timm state dict needs --recipe for its architecture; with it, the export is that state dict, normalised
    as the recipe says."""
    backbone = build_backbone(ARCH, **{**SIZES, "img_size": 16}, pos_embed="learned")
    torch.manual_seed(3)
    with torch.no_grad():
        for param in backbone.vit.parameters():
            param.normal_(0, 0.2)
    backbone.eval()
    file = tmp_path / "weights.pth"
    torch.save({"model": backbone.vit.state_dict()}, file)
    err = one_line_error(["export", str(file), "--to", str(tmp_path / "out")], capsys)
    assert "--recipe" in err
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["backbone"]["pos_embed"] = "learned"
    recipe["data"]["mean"], recipe["data"]["std"] = [0.25], [0.125]
    path = write_recipe(recipe)
    assert main(["export", str(file), "--to", str(tmp_path / "out"), "--recipe", str(path), "--format", "timm"]) == 0
    x = images(size=16)
    assert (timm_features(tmp_path / "out", x) - features(backbone, x)).abs().max() <= 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.25] and config["pretrained_cfg"]["std"] == [0.125]
    assert one_line_error(["export", str(file), "--to", str(tmp_path / "o2"), "--recipe", str(path),
                           "--weights", "ema"], capsys)


# --- refusals --------------------------------------------------------------------------------------------------
def test_post_norm_is_refused(tmp_path, capsys):
    """A data2vec 2.0-style backbone (post-norm blocks) has no plain-timm form: one line, nothing written."""
    backbone = random_backbone("sincos", 0, block="post_norm", pre_norm=True, final_norm=False, no_embed_class=True)
    recipe = {**backbone_recipe(), "checkpoint": "d2v.pt", "checkpoint_format": "data2vec2"}
    source = save_sslbench(tmp_path / "backbone.pt", backbone, recipe=recipe)
    err = one_line_error(["export", str(source), "--to", str(tmp_path / "out")], capsys)
    assert "post-norm" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt"]


def test_pre_norm_with_patch_bias_is_refused():
    from sslbench.core.timm_export import check_expressible, model_args

    backbone = build_backbone(ARCH, **SIZES, pre_norm=True)
    with pytest.raises(UserError, match="norm_pre"):
        check_expressible(backbone.vit, ARCH, model_args(backbone.vit, ARCH))


def test_destination_rules(tmp_path, capsys):
    source = save_sslbench(tmp_path / "src" / "backbone.pt", random_backbone("sincos", 0))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not empty" in one_line_error(["export", str(source), "--to", str(busy)], capsys)
    assert "not an sslbench export" in one_line_error(["export", str(source), "--to", str(busy), "--force"], capsys)
    assert (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert main(["export", str(source), "--to", str(out)]) == 0
    assert "not empty" in one_line_error(["export", str(source), "--to", str(out)], capsys)
    (out / "stale.txt").write_text("old")
    assert main(["export", str(source), "--to", str(out), "--force"]) == 0   # an earlier export is replaced
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "out", "src"]


def test_input_errors(tmp_path, capsys):
    assert "no such run folder" in one_line_error(["export", str(tmp_path / "nope.pt"), "--to",
                                                   str(tmp_path / "out")], capsys)
    source = save_sslbench(tmp_path / "backbone.pt", random_backbone("sincos", 0))
    assert "unknown" in one_line_error(["export", str(source), "--to", str(tmp_path / "out"), "--format",
                                        "nonsense"], capsys).lower()
    assert "no EMA" in one_line_error(["export", str(source), "--to", str(tmp_path / "out"), "--weights", "ema"],
                                      capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "--recipe" in one_line_error(["export", str(garbage), "--to", str(tmp_path / "out")], capsys)
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    assert "recipe.json" in one_line_error(["export", str(folder), "--to", str(tmp_path / "out")], capsys)
    assert "--push-to-hub" in one_line_error(["export", str(source), "--to", str(tmp_path / "out"), "--private"],
                                             capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "garbage.pt", "not-a-run"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import sslbench.results.model_card as card

    source = save_sslbench(tmp_path / "backbone.pt", random_backbone("sincos", 0))

    def broken(facts):
        raise RuntimeError("disk full")

    monkeypatch.setattr(card, "model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(str(source), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt"]


# --- the Hub ---------------------------------------------------------------------------------------------------
class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, exist_ok=False, private=None):
        self.calls.append(("create_repo", repo_id, exist_ok, private))
        return type("RepoUrl", (), {"repo_id": repo_id, "url": f"https://huggingface.co/{repo_id}"})()

    def upload_folder(self, *, repo_id, folder_path, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


def test_push_uploads_the_exported_folder(tmp_path, capsys):
    source = save_sslbench(tmp_path / "backbone.pt", random_backbone("sincos", 0))
    api = RecordingApi()
    folder = export_model(str(source), str(tmp_path / "out"), push_to_hub="someone/tiny-vit", private=True, api=api)
    assert api.calls == [("create_repo", "someone/tiny-vit", True, True),
                         ("upload_folder", "someone/tiny-vit", str(folder),
                          ["README.md", "config.json", "model.safetensors"])]
    assert 'timm.create_model("hf-hub:someone/tiny-vit", pretrained=True)' in (folder / "README.md").read_text()
    assert "commit/1" in capsys.readouterr().out


def test_push_with_the_real_api_offline(tmp_path, monkeypatch):
    """huggingface_hub's own HfApi, with HF_HUB_OFFLINE: one line naming the repo and the cause, the export kept."""
    import time

    import huggingface_hub.constants

    from sslbench.commands.hub import push_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = save_sslbench(tmp_path / "backbone.pt", random_backbone("sincos", 0))
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        export_model(str(source), str(tmp_path / "out"), push_to_hub="someone/tiny-vit")
    message = str(caught.value)
    assert "someone/tiny-vit" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_folder(tmp_path / "out", "someone/tiny-vit")
    assert time.monotonic() - start < 60


def test_hub_errors_name_the_cause():
    from huggingface_hub.errors import LocalTokenNotFoundError

    from sslbench.commands.hub import hub_error

    class Response:
        status_code = 403

    class Forbidden(Exception):
        response = Response()

    assert "HF_TOKEN" in hub_error(LocalTokenNotFoundError("no token"), "a/b")
    assert "write access" in hub_error(Forbidden("denied"), "a/b")
    assert "cannot reach" in hub_error(ConnectionError("Name or service not known"), "a/b")
