"""The leaderboard on synthetic run folders: headline columns per protocol, intervals, tests against a base and a
baseline, budgets, Markdown, CSV, plots and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sslbench.cli import main
from sslbench.core.evaluator import PerSample
from sslbench.core.registry import build_registry
from sslbench.results import leaderboard
from sslbench.results.budget import format_budget, run_budget
from sslbench.results.metrics import collect_runs, write_metrics
from sslbench.results.predictions import write_predictions
from sslbench.results.statistics import binomial_interval

REGISTRY = build_registry()
CLASSES = {name: REGISTRY.get("evaluator", name).factory for name in REGISTRY.names("evaluator")}
LABELS = np.arange(450) % 10                                         # a 450-image test set, like the digits'


def make_run(root: Path, name: str, results: list[tuple[str, str, dict, object]], *, seed: int = 0,
             start: str = "scratch", protocol: str = "p" * 16, stage: str = "train", log=None,
             checkpoint_format: str = "sslbench") -> Path:
    """A run folder as `sslbench run` leaves it. ``results``: (evaluator, metric, fields, per-sample scores or a
    plain value); scores are recorded in predictions.npz, the row's value is their mean in percent."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    recipe = {"stages": [{"name": stage, "batch_size": 100, "epochs": None}],
              "backbone": {"checkpoint": None if start == "scratch" else start,
                           "checkpoint_format": checkpoint_format}}
    (run_dir / "recipe.json").write_text(json.dumps({"recipe_hash": "h" * 64, "recipe": recipe}))
    rows, records = [], []
    recipe_name = name.rsplit("-seed", 1)[0]
    for evaluator, metric, fields, scores in results:
        from sslbench.core.evaluator import format_variant

        value = 100 * float(np.mean(scores)) if isinstance(scores, np.ndarray) else float(scores)
        row = dict(run_id=name, recipe_hash="h" * 16, protocol_hash=protocol, objective=recipe_name.split("_")[0],
                   backbone="vit", dataset="digits", checkpoint=f"{start} → {recipe_name}/{stage}", seed=seed,
                   stage=stage, evaluator=evaluator, metric=metric, variant=format_variant(fields), fields=fields,
                   value=value)
        rows.append(row)
        if isinstance(scores, np.ndarray):
            records.append((row, PerSample("mean", scores)))
    write_metrics(run_dir, rows)
    if records:
        write_predictions(run_dir, records, LABELS)
    lines = log or [{"stage": 0, "step": 10, "epoch": 0.5, "images_per_s": 100.0},
                    {"stage": 0, "step": 20, "epoch": 1.0, "images_per_s": 50.0}]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def correct(n_right: int, offset: int = 0) -> np.ndarray:
    """0/1 scores: the first ``n_right`` test images (shifted by ``offset``) right."""
    scores = np.zeros(len(LABELS), dtype=bool)
    scores[offset:offset + n_right] = True
    return scores


def knn(scores, k: int = 20) -> tuple:
    return ("knn", "top1", {"k": k, "feature": "b5.cls.normed", "std": False}, scores)


def test_headline_columns_are_chosen_per_protocol_from_its_evaluators(tmp_path):
    make_run(tmp_path, "a", [knn(correct(300), 10), knn(correct(310), 20),
                             ("knn", "top5", {"k": 20, "feature": "b5.cls.normed", "std": False}, correct(400)),
                             ("linear_probe", "top1", {"head": "best", "stream": "normed"}, correct(350)),
                             ("linear_probe", "val_top1", {"head": "best", "stream": "normed"}, 90.0),
                             ("linear_probe", "top1", {"head": "last1", "stream": "normed"}, correct(340))],
             protocol="A" * 16)
    per_block = [("per_block", "top1", {"k": 20, "block": b, "stream": s, "std": False}, correct(200 + 30 * b - b * b))
                 for b in range(6) for s in ("raw", "normed")]
    make_run(tmp_path, "b", [("low_shot", "top1", {"setting": "1shot", "feature": "b5"}, 40.0),
                             ("low_shot", "top1", {"setting": "5shot", "feature": "b5"}, 60.0),
                             ("low_shot", "top1_std", {"setting": "5shot", "feature": "b5"}, 1.0),
                             ("low_shot", "top1", {"setting": "10pct", "feature": "b5"}, 70.0),
                             ("clustering", "acc", {"split": "test", "feature": "b5"}, correct(150)),
                             ("clustering", "nmi", {"split": "test", "feature": "b5"}, 33.0), *per_block],
             protocol="B" * 16)
    board = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES)
    first, second = board.protocols
    assert first.labels == ["k-NN top-1", "linear top-1"]
    assert second.labels == ["10% labels", "5-shot", "cluster ACC", "cluster NMI", "best block"]
    assert first.headlines["a/train"]["k-NN top-1"].fields["k"] == 20                 # DINO's k where measured
    best = second.headlines["b/train"]["best block"]
    assert best.fields == {"k": 20, "block": 5, "stream": "normed", "std": False}       # 200 + 30b − b² peaks at 5
    markdown = (leaderboard.write(board, tmp_path) and (tmp_path / "leaderboard.md").read_text())
    assert "| 5 of 6 (" in markdown and "## digits · protocol AAAAAAAAAAAA" in markdown
    assert max(len(line) for line in markdown.splitlines()) <= 200


def test_one_seed_gets_the_exact_interval_of_its_test_samples(tmp_path):
    make_run(tmp_path, "a", [knn(correct(294))])
    result = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).entries[0].results[
        ("knn", "top1", "k=20,b5.cls.normed")]
    expected = binomial_interval(294, 450)
    assert (result.interval.low, result.interval.high) == pytest.approx((100 * expected.low, 100 * expected.high))
    assert result.mean == pytest.approx(100 * 294 / 450) and "Clopper-Pearson" in result.interval.method


def test_a_refinement_is_tested_against_its_base(tmp_path):
    start = str(tmp_path / "base" / "checkpoints" / "backbone.pt")
    make_run(tmp_path, "base", [knn(correct(300))])
    make_run(tmp_path, "better", [knn(correct(340))], start=start)      # right on the base's 300 and 40 more
    make_run(tmp_path, "noise", [knn(correct(302))], start=start)       # 2 more: not a real difference
    make_run(tmp_path, "other", [knn(correct(300, offset=150))])        # not started from the base
    board = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES)
    protocol, = board.protocols
    assert protocol.bases["better/train"].name == "base/train" and protocol.bases["other/train"] is None
    assert protocol.baseline.name == "base/train"                        # the base of the most rows
    tests = {(c.entry, c.relation): c for c in protocol.comparisons}
    better = tests[("better/train", "base")]
    # McNemar: 40 discordant samples all in favour → p = 2 · 0.5⁴⁰
    assert better.significant and better.p_value == pytest.approx(2 * 0.5 ** 40)
    assert better.difference == pytest.approx(100 * 40 / 450) and "McNemar" in better.method
    assert not tests[("noise/train", "base")].significant
    other = tests[("other/train", "baseline")]                           # same accuracy, other images right
    assert other.difference == pytest.approx(0.0) and not other.significant
    cells = {line.split("|")[1].strip(): line for line in leaderboard_markdown_lines(board)}
    assert "▲" in cells["better/train"] and "▲" not in cells["noise/train"] and "▼" not in cells["noise/train"]


def leaderboard_markdown_lines(board) -> list[str]:
    from sslbench.results.markdown import leaderboard_markdown

    text = leaderboard_markdown(board)
    headline = text.split("| run | objective |", 1)[1].split("\n\n", 1)[0]
    return [line for line in headline.splitlines()[2:] if line.startswith("|")]


def test_several_seeds_need_the_seed_test_to_agree(tmp_path):
    """A paired test over test samples alone would call a difference of one lucky seed significant."""
    start = str(tmp_path / "base-seed0" / "checkpoints" / "backbone.pt")
    for seed, right in enumerate((300, 305, 295)):
        make_run(tmp_path, f"base-seed{seed}", [knn(correct(right))], seed=seed)
    for seed, right in enumerate((380, 290, 300)):                       # one seed far ahead, the others not
        make_run(tmp_path, f"ref-seed{seed}", [knn(correct(right))], seed=seed, start=start)
    for seed, right in enumerate((330, 332, 329)):                       # from scratch, steadily ahead
        make_run(tmp_path, f"steady-seed{seed}", [knn(correct(right))], seed=seed)
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).protocols
    tests = {(c.entry, c.relation): c for c in protocol.comparisons}
    # the refinement's three seeds all started from seed 0's checkpoint: compared with that model alone
    ref = tests[("ref/train", "base")]
    assert ref.against == "base/train (seed 0)" and ref.difference == pytest.approx(100 * (970 / 3 - 300) / 450)
    assert "paired bootstrap" in ref.method and "3 seeds vs 1" in ref.method and not ref.significant
    # two recipes with three seeds each: Welch's test over the seeds, and it agrees with the paired test here
    steady = tests[("steady/train", "baseline")]
    assert "Welch" in steady.method and steady.significant and steady.against == "base/train"
    entry = next(e for e in protocol.entries if e.name == "ref/train")
    assert entry.seeds == 3 and entry.results[("knn", "top1", "k=20,b5.cls.normed")].interval.method.startswith(
        "t over 3")


def test_budget_is_read_from_the_log(tmp_path):
    run_dir = make_run(tmp_path, "a", [knn(correct(300))])
    budget = run_budget(run_dir)
    # 10 steps of 100 images at 100 img/s, then 10 more at 50 img/s: 10 s + 20 s of training
    assert (budget.epochs, budget.images, budget.seconds, budget.steps) == (1.0, 2000, 30.0, 20)
    assert format_budget(budget) == "1 ep · 2k img · 30 s" and format_budget(None) == "eval only"
    (run_dir / "log.jsonl").write_text('{"stage": 0, "step": 5, "images_per_s": 10}\n{"stage": 0, "st')  # cut
    assert run_budget(run_dir).images == 500 and run_budget(run_dir).epochs is None


def test_leaderboard_files_and_plots_from_the_command(tmp_path, capsys):
    from PIL import Image

    start = str(tmp_path / "base" / "checkpoints" / "backbone.pt")
    blocks = [("per_block", "top1", {"k": 20, "block": b, "stream": "normed", "std": False}, correct(250 + 10 * b))
              for b in range(4)]
    make_run(tmp_path, "base", [knn(correct(300)), *blocks])
    make_run(tmp_path, "ref", [knn(correct(330)), *blocks], start=start)
    assert main(["leaderboard", str(tmp_path), "--plots"]) == 0
    out = capsys.readouterr().out
    assert "2 rows in 1 protocol(s)" in out
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["headline_digits_pppppppppppp.png", "per_block_digits_pppppppppppp.png"]
    assert all(Image.open(tmp_path / "plots" / n).size[0] > 400 for n in names)
    long = pd.read_csv(tmp_path / "leaderboard_long.csv")
    assert len(long) == 2 * 5 and set(long["entry"]) == {"base/train", "ref/train"}
    headline = pd.read_csv(tmp_path / "leaderboard.csv")
    assert list(headline["entry"]) == ["base/train", "ref/train"] and headline["k-NN top-1 vs base p"].notna().sum() == 1
    assert (tmp_path / "leaderboard_details.md").read_text().count("### ") == 2          # knn, per_block
    assert main(["leaderboard", str(tmp_path), "--baseline", "nobody"]) == 2
    assert "--baseline" in capsys.readouterr().err
    assert main(["leaderboard", str(tmp_path / "missing")]) == 2


def test_value_axis_zooms_only_when_the_values_are_close():
    from sslbench.results.board_plots import value_axis

    assert value_axis([20.0, 60.0], [30.0, 80.0]) == (0.0, 100.0, False)
    low, high, zoomed = value_axis([80.1, 80.5], [80.9, 81.3])
    assert zoomed and low == pytest.approx(79.1) and high == pytest.approx(82.3)


def test_a_base_is_only_the_model_that_was_loaded(tmp_path, capsys):
    """A refinement of `a-seed0` is not compared with other seeds of `a` when seed 0 is not among them."""
    make_run(tmp_path, "a-seed1", [knn(correct(200))], seed=1)
    make_run(tmp_path, "a-seed2", [knn(correct(210))], seed=2)
    make_run(tmp_path, "ref", [knn(correct(300))], start=str(tmp_path / "a-seed0" / "checkpoints" / "backbone.pt"))
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).protocols
    assert protocol.bases["ref/train"] is None
    assert not [c for c in protocol.comparisons if c.relation == "base"]


def test_a_baselines_single_seed_is_not_a_fixed_number(tmp_path):
    """Another recipe's one seed is a random training: no one-sample t-test against it, only the paired test."""
    make_run(tmp_path, "base", [knn(correct(300))])
    make_run(tmp_path, "child", [knn(correct(300))], start=str(tmp_path / "base" / "checkpoints" / "backbone.pt"))
    for seed, right in enumerate((306, 304, 305)):
        make_run(tmp_path, f"other-seed{seed}", [knn(correct(right, offset=100))], seed=seed)
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).protocols
    other = next(c for c in protocol.comparisons if c.entry == "other/train")
    assert other.relation == "baseline" and "seeds vs 1" not in other.method and "McNemar" not in other.method


def test_rows_with_the_same_name_stay_apart(tmp_path):
    make_run(tmp_path / "x", "a", [knn(correct(200))])
    run = make_run(tmp_path / "y", "a", [knn(correct(300))])
    frame = pd.read_csv(run / "metrics.csv")
    frame["objective"] = "other"                                          # same recipe name, another objective
    frame.to_csv(run / "metrics.csv", index=False)
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).protocols
    names = sorted(e.name for e in protocol.entries)
    assert names == ["a/train (a)", "a/train (other)"]
    values = {name: protocol.headlines[name]["k-NN top-1"].mean for name in names}
    assert values == pytest.approx({names[0]: 100 * 200 / 450, names[1]: 100 * 300 / 450})


def test_damaged_files_and_missing_values_do_not_stop_the_leaderboard(tmp_path, capsys):
    good = make_run(tmp_path, "good", [knn(correct(300))])
    bad = make_run(tmp_path, "bad", [knn(correct(250)), ("per_block", "top1", {"k": 20, "block": 0,
                                                                               "stream": "normed"}, float("nan"))])
    (bad / "predictions.npz").write_bytes((good / "predictions.npz").read_bytes()[:100])   # cut short
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "predictions.npz" in err and "without per-sample intervals" in err
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert board.set_index("entry").loc["bad/train", "k-NN top-1"] == pytest.approx(100 * 250 / 450)
    assert (tmp_path / "report.html").stat().st_size > 1000
    # a protocol that no longer has rows loses its figures; other files in plots/ stay
    (tmp_path / "plots" / "headline_old_000000000000.png").write_bytes(b"old")
    (tmp_path / "plots" / "notes.txt").write_text("mine")
    assert main(["leaderboard", str(tmp_path), "--plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "headline_digits_pppppppppppp.png", "notes.txt"]


def test_an_evaluated_file_is_the_base_of_a_run_that_started_from_it(tmp_path):
    """`sslbench eval` of a checkpoint under the refinement's protocol is that checkpoint's row."""
    start = str(tmp_path / "elsewhere" / "mae" / "checkpoints" / "backbone.pt")
    evaluated = make_run(tmp_path, "eval-mae", [knn(correct(300))])
    frame = pd.read_csv(evaluated / "metrics.csv")
    frame["checkpoint"], frame["stage"] = start, "eval"                 # as `sslbench eval --checkpoint` writes
    frame.to_csv(evaluated / "metrics.csv", index=False)
    make_run(tmp_path, "ref", [knn(correct(340))], start=start)
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES, predictions={}).protocols
    assert protocol.bases["ref/train"].name == "eval-mae" and protocol.bases["eval-mae"] is None


def test_seeds_of_an_edited_recipe_are_not_averaged(tmp_path):
    make_run(tmp_path, "a-seed0", [knn(correct(300))], seed=0)
    edited = make_run(tmp_path, "a-seed1", [knn(correct(200))], seed=1)
    meta = json.loads((edited / "recipe.json").read_text())
    meta["recipe"]["stages"][0]["batch_size"] = 64                       # changed between the two --seed runs
    (edited / "recipe.json").write_text(json.dumps(meta))
    make_run(tmp_path, "a-seed2", [knn(correct(310))], seed=2)
    protocol, = leaderboard.build(collect_runs(tmp_path), evaluator_classes=CLASSES).protocols
    seeds = sorted((e.seeds, sorted(e.runs.values())) for e in protocol.entries)
    assert seeds == [(1, ["a-seed1"]), (2, ["a-seed0", "a-seed2"])]
    assert all(e.name.startswith("a/train (recipe ") for e in protocol.entries)
