"""`sslbench publish` and where runs go: a user's runs never write into the committed reference results."""

from __future__ import annotations

from pathlib import Path

from sslbench.cli import main

from .test_leaderboard import correct, knn, make_run


def test_user_runs_default_to_a_git_ignored_folder():
    from sslbench.training.recipe import RUN

    root = Path(__file__).parents[1]
    assert RUN["output_dir"].default == "runs"
    ignored = (root / ".gitignore").read_text().splitlines()
    assert "runs/" in ignored and "results/*/checkpoints/" in ignored


def test_publish_copies_a_run_without_its_checkpoints(tmp_path, capsys):
    run_dir = make_run(tmp_path / "runs", "digits_mae-seed0", [knn(correct(300))])
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"weights")
    (run_dir / "metrics.csv.lock").write_text("")
    results = tmp_path / "results"
    assert main(["publish", str(run_dir), "--to", str(results)]) == 0
    published = results / "digits_mae-seed0"
    assert sorted(p.name for p in published.iterdir()) == ["log.jsonl", "metrics.csv", "predictions.npz",
                                                            "recipe.json"]
    assert (published / "metrics.csv").read_bytes() == (run_dir / "metrics.csv").read_bytes()
    assert "sslbench leaderboard" in capsys.readouterr().out
    # a second publish of the same name is refused without --force, and nothing is half-copied
    (published / "extra.txt").write_text("kept")
    assert main(["publish", str(run_dir), "--to", str(results)]) == 2
    assert "--force" in capsys.readouterr().err and (published / "extra.txt").exists()
    assert main(["publish", str(run_dir), "--to", str(results), "--force"]) == 0
    assert not (published / "extra.txt").exists()
    assert sorted(p.name for p in results.iterdir()) == ["digits_mae-seed0"]            # no temporary folder left
    # not a run: refused before anything is copied
    (tmp_path / "stray").mkdir()
    assert main(["publish", str(run_dir), str(tmp_path / "stray"), "--to", str(tmp_path / "elsewhere")]) == 2
    assert "not a finished sslbench run" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
