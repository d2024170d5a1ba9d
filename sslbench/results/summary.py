"""What a finished run tells its user: where every file is, and its headline results in words with intervals."""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_summary"]

#: The files of a run folder, in the order a user looks for them, with what each is for.
FILES = (
    ("recipe.toml", "the resolved recipe (recipe.json: with its hashes)"),
    ("log.jsonl", "loss, learning rate, epoch and images/s of every logged step (and the online k-NN of [monitor])"),
    ("metrics.csv", "every result, one row each"),
    ("predictions.npz", "per-sample records: intervals and paired tests in the leaderboard"),
    ("per_block.png", "k-NN accuracy per block (per_block.csv: the table)"),
    ("training.png", "the training signals of log.jsonl: loss, neighbour agreement, collapse, online k-NN"),
    ("checkpoints/backbone.pt", "the trained encoder, for downstream recipes and `sslbench eval`"),
)


def _interval_words(result) -> str:
    interval = result.interval
    if interval is None:
        return ""
    return f" (95% interval {interval.low:.1f}–{interval.high:.1f}, {interval.method})"


def run_summary(run_dir: str | Path, rows: list[dict], leaderboard: str | Path | None = None,
                verb: str = "Finished") -> str:
    """Lines for the end of ``sslbench run`` / ``sslbench eval``: the folder and its files, then each headline
    result of the run (as the leaderboard chooses them) in words, then where the leaderboard is. ``verb`` opens
    the first line (``"Finished"``, or ``"Already finished"`` for a run that trained nothing)."""
    from sslbench.results.leaderboard import build
    from sslbench.results.metrics import as_frame

    run_dir = Path(run_dir)
    lines = [f"{verb} {run_dir.name}: everything is in {run_dir}/"]
    width = max(len(name) for name, _ in FILES)
    lines += [f"  {name:<{width}}  {what}" for name, what in FILES if (run_dir / name).exists()]
    if rows:
        frame = as_frame(rows)
        frame["run_dir"] = str(run_dir)
        board = build(frame)
        for protocol in board.protocols:
            for entry in protocol.entries:
                headline = protocol.headlines.get(entry.name, {})
                lines.append(f"Results of {entry.name} on {protocol.dataset} ({len(entry.results)} in metrics.csv; "
                             "the headline ones):" if headline else
                             f"Results of {entry.name}: {len(entry.results)} rows in metrics.csv")
                for label, result in headline.items():
                    shown = protocol.shown_fields.get(label)
                    if shown:
                        lines.append(f"  {label}: {shown} {result.fields.get(shown)} "
                                     f"({result.metric} {result.mean:.2f}%, {result.variant})")
                    else:
                        lines.append(f"  {label}: {result.mean:.2f}%{_interval_words(result)} — {result.variant}")
    if leaderboard is not None:
        lines.append(f"Leaderboard of every run in {Path(leaderboard).parent}: {leaderboard}")
    return "\n".join(lines)
