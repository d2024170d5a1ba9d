"""A corpus of bad inputs: each is refused with exit code 2 and one line naming the key or file, and leaves nothing
behind — no run folder, no leaderboard — so the corrected recipe then runs without --force."""

from __future__ import annotations

import copy
import io
import subprocess

import pytest
from PIL import Image

from ..conftest import dump_recipe, sslbench_cmd
from .conftest import files_under


def _image_folder(root, corrupt: str | None = None):
    """A real image folder (2 classes × 6 grey PNGs) with, optionally, one corrupt or truncated file."""
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), color=40 * i + (0 if label == "a" else 20)).save(root / label / f"{i}.png")
    if corrupt == "random":
        (root / "a" / "bad.png").write_bytes(b"\x89PNG this is not an image at all" * 4)
    elif corrupt == "truncated":
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 60).convert("L").save(buffer, format="PNG")
        (root / "b" / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


def _folder_recipe(recipe, root):
    recipe["data"] = {"train": {"source": "imagefolder", "path": str(root)},
                      "test": {"source": "imagefolder", "path": str(root)}}
    recipe["stages"][0]["batch_size"] = 4
    recipe["eval"] = [{"name": "knn", "k": [3]}]
    return recipe


def _set(path: str, value):
    def change(recipe, tmp_path):
        target = recipe
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
        return recipe
    return change


# (id, change of the tiny recipe, texts the error line must contain)
CASES = [
    ("lr_nan", _set("stages.0.optimizer.lr", float("nan")), ["stages[0].optimizer.lr", "finite"]),
    ("lr_inf", _set("stages.0.optimizer.lr", float("inf")), ["stages[0].optimizer.lr", "finite"]),
    ("betas_nan", _set("stages.0.optimizer.betas", [0.9, float("nan")]), ["stages[0].optimizer.betas[1]"]),
    ("temperature_nan", _set("eval.0.temperature", float("nan")), ["eval[0].temperature"]),
    ("unknown_key", _set("stages.0.learning_rate", 1.0), ["stages[0].learning_rate", "unknown key"]),
    ("missing_dataset", _set("data.train", {"source": "imagefolder", "path": "/nonexistent/images"}),
     ["data.train", "/nonexistent/images"]),
    ("batch_larger_than_data", _set("stages.0.batch_size", 100_000), ["stages[0].batch_size", "larger than"]),
    ("rgb_backbone_on_grey_images", _set("backbone.in_chans", 3), ["data.train", "in_chans"]),
    ("k_larger_than_train", _set("eval.0.k", [5, 100_000]), ["eval[0]", "k:", "100000"]),
    ("freeze_matches_nothing", _set("stages.0.freeze", ["backbone.nothing.*"]), ["stages[0].freeze[0]"]),
    ("everything_frozen", _set("stages.0.freeze", ["backbone", "heads"]), ["stages[0].freeze", "nothing to train"]),
    ("checkpoint_missing", _set("backbone.checkpoint", "/nonexistent/weights.pt"),
     ["backbone.checkpoint", "/nonexistent/weights.pt"]),
    ("corrupt_image", lambda r, tmp: _folder_recipe(r, _image_folder(tmp / "corrupt", "random")),
     ["bad.png", "cannot be decoded"]),
    ("truncated_image", lambda r, tmp: _folder_recipe(r, _image_folder(tmp / "truncated", "truncated")),
     ["cut.png", "cannot be decoded"]),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_is_refused_in_one_line_and_leaves_nothing(change, expected, tiny_recipe, tmp_path, write_recipe,
                                                              refused):
    recipe = change(copy.deepcopy(tiny_recipe), tmp_path)
    path = write_recipe(recipe)
    refused(["run", path, "--no-progress"], *expected)
    assert files_under(tmp_path / "runs") == []                     # no run folder and no leaderboard


def test_corrected_recipe_then_runs_without_force(tiny_recipe, tmp_path, write_recipe, refused, capsys):
    bad = copy.deepcopy(tiny_recipe)
    bad["stages"][0]["batch_size"] = 100_000
    refused(["run", write_recipe(bad), "--no-progress"], "batch_size")
    from sslbench.cli import main

    assert main(["run", str(write_recipe(tiny_recipe)), "--no-progress"]) == 0
    assert (tmp_path / "runs" / "tiny" / "metrics.csv").is_file()
    out = capsys.readouterr().out                                    # the run says where its results went
    assert f"everything is in {tmp_path / 'runs' / 'tiny'}/" in out and "k-NN top-1: " in out
    assert out.strip().splitlines()[-1].endswith(f"{tmp_path / 'runs' / 'leaderboard.md'}")
    # the same recipe again trains nothing and says so, with the results
    log = (tmp_path / "runs" / "tiny" / "log.jsonl").read_bytes()
    assert main(["run", str(write_recipe(tiny_recipe)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already ran to the end" in out and "k-NN top-1: " in out and "--force" in out
    assert (tmp_path / "runs" / "tiny" / "log.jsonl").read_bytes() == log


def test_a_good_image_folder_trains(tiny_recipe, tmp_path, write_recipe):
    """The image-folder corpus is valid apart from its one bad file."""
    from sslbench.cli import main

    recipe = _folder_recipe(copy.deepcopy(tiny_recipe), _image_folder(tmp_path / "good"))
    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0


@pytest.mark.parametrize("content,expected", [
    (b"\xff\xfe[run]\nname = 'x'\n", "not a UTF-8 text file"),
    (b"[run\nname = ", "not valid TOML"),
    (b"[run]\nname = 'a'\nname = 'b'\n", "not valid TOML"),
], ids=["not_utf8", "broken_toml", "duplicate_key"])
@pytest.mark.parametrize("command", ["run", "check"])
def test_unreadable_recipe_file(command, content, expected, tmp_path, refused):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    refused([command, path], str(path), expected)


def test_check_refuses_what_run_refuses(tiny_recipe, write_recipe, refused):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["stages"][0]["optimizer"]["lr"] = float("nan")
    refused(["check", write_recipe(recipe)], "stages[0].optimizer.lr")


def test_random_bytes_checkpoint_is_one_short_line(tiny_recipe, tmp_path, write_recipe, refused):
    weights = tmp_path / "random.pt"
    weights.write_bytes(bytes(range(256)) * 40)
    recipe = copy.deepcopy(tiny_recipe)
    recipe["backbone"]["checkpoint"] = str(weights)
    line = refused(["run", write_recipe(recipe), "--no-progress"], str(weights), "cannot read checkpoint")
    assert len(line) < 400
    refused(["eval", write_recipe(tiny_recipe), "--checkpoint", weights], str(weights))
    assert files_under(tmp_path / "runs") == []


def test_errors_reach_the_shell_as_exit_2_without_traceback(tiny_recipe, tmp_path):
    """The same promise through the real entry point, for two cases."""
    for name, change in (("nan", ("stages", 0, "optimizer", "lr", float("nan"))),
                         ("escape", ("run", "name", "../../outside"))):
        recipe = copy.deepcopy(tiny_recipe)
        *keys, last, value = change
        target = recipe
        for key in keys:
            target = target[key]
        target[last] = value
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_recipe(recipe))
        done = subprocess.run(sslbench_cmd() + ["run", str(path)], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path.parent / "outside").exists()
    assert files_under(tmp_path / "runs") == []


def test_truncated_resume_checkpoint_is_one_line_and_touches_nothing(tiny_recipe, tmp_path, write_recipe, refused):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"]["checkpoint_every"] = 2
    path = write_recipe(recipe)
    from sslbench.cli import main

    assert main(["run", str(path), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused(["run", path, "--resume", "--no-progress"], str(last), "not a readable sslbench resume checkpoint",
            "--force")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_met_during_training_is_one_line(workers, tmp_path):
    """Lazy storage decodes per batch (in DataLoader workers when there are any), so a file damaged after the
    dataset was opened is met only while training; its error is still the one line naming the file, not a worker's
    traceback."""
    import torch

    from sslbench.data.sources import load_imagefolder
    from sslbench.core.errors import UserError
    from sslbench.data.lazy import decoded_batches

    root = _image_folder(tmp_path / "lazy")
    dataset = load_imagefolder(path=str(root), storage="lazy", hf_cache_dir=str(tmp_path / "hf"))
    (root / "b" / "3.png").write_bytes(b"overwritten by a failing disk")
    with pytest.raises(UserError) as caught:
        for _ in decoded_batches(dataset, [torch.arange(i, i + 4) for i in range(0, 12, 4)], workers=workers):
            pass
    message = str(caught.value)
    assert "3.png" in message and "cannot be decoded" in message
    assert "\n" not in message and "Traceback" not in message and "worker" not in message


def test_resuming_with_another_model_is_refused_before_the_checkpoint_is_read(tiny_recipe, tmp_path, write_recipe,
                                                                              refused):
    """A wider backbone cannot take the saved weights: the recipe mismatch is reported, not a shape traceback."""
    recipe = copy.deepcopy(tiny_recipe)
    recipe["run"]["checkpoint_every"] = 2
    from sslbench.cli import main

    assert main(["run", str(write_recipe(recipe)), "--no-progress"]) == 0
    wider = copy.deepcopy(recipe)
    wider["backbone"]["embed_dim"] = 64
    refused(["run", write_recipe(wider, "wider.toml"), "--resume", "--no-progress"],
            "holds a run of a different recipe", "backbone.embed_dim")
