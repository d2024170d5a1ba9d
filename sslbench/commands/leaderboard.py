"""`sslbench leaderboard` and `sslbench report`: the leaderboard of a results folder, written into it."""

from __future__ import annotations

from pathlib import Path

from sslbench.core.errors import UserError


def leaderboard_command(directory: str, *, baseline: str | None = None, plots: bool = False,
                        report: bool = False) -> int:
    """Build the leaderboard of every run below ``directory`` and write it there (``leaderboard.md``, ``.csv``,
    ``_long.csv``, ``_details.md``); with ``plots`` the figures in ``plots/``; with ``report`` also
    ``report.html`` (which embeds the figures). Prints what was written."""
    from sslbench.core.io import file_lock
    from sslbench.results import leaderboard
    from sslbench.results.metrics import collect_runs

    from sslbench.results.compare import is_named

    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: no such results folder; expected a folder holding run folders with metrics.csv "
                        "(your runs are in runs/, the committed reference runs in results/)")
    with file_lock(root / "leaderboard.lock"):
        board = leaderboard.build(collect_runs(root), baseline=baseline)
        if baseline is not None and not any(is_named(e, baseline) for e in board.entries):
            raise UserError(f"--baseline: no row or run folder named {baseline!r} in {root}; the rows are: "
                            + ", ".join(sorted({e.name for e in board.entries})))
        written = leaderboard.write(board, root)
        if plots and not report:                    # the report draws (and keeps) the figures itself
            from sslbench.results.board_plots import write_board_plots

            written += write_board_plots(board, root / "plots")
        if report:
            from sslbench.results.board_plots import write_board_plots
            from sslbench.results.report import write_report

            figures = write_board_plots(board, root / "plots")
            written += figures + [write_report(board, root, drawn=figures)]
    rows = sum(len(p.entries) for p in board.protocols)
    print(f"{rows} rows in {len(board.protocols)} protocol(s) from {root}:")
    for path in written:
        print(f"  {path}")
    return 0
