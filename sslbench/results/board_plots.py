"""The leaderboard's figures, one pair per protocol (all its rows on one axes, never rows of two protocols):

* ``per_block_<dataset>_<protocol>.png`` — k-NN top-1 of every block, one line per row with its 95% interval as a
  band: the MIM-Refiner paper's figure 1 view (a MIM model peaks in the middle, a refined one at the end);
* ``learning_<dataset>_<protocol>.png`` — the online k-NN (``[monitor]``) against epoch, one line per run and seed
  (a row's seeds in one colour), drawn only when runs logged monitor lines;
* ``headline_<dataset>_<protocol>.png`` — the headline metrics as dots with 95% error bars, one panel per metric.
  Dots, not bars: a bar's length reads as the value, so a bar chart whose axis does not start at 0 exaggerates; a
  dot's position does not. A panel whose axis does not start at 0 says so on the axis.

Legends use the rows' short names; file names the dataset and the protocol hash's first 12 characters.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from sslbench.results.plots import pyplot, save_figure

__all__ = ["per_block_curves", "plot_protocol_per_block", "plot_protocol_headline", "plot_protocol_learning",
           "write_board_plots", "value_axis", "plot_name", "FIGURES"]


def plot_name(kind: str, protocol) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", protocol.dataset).strip("_") or "data"
    return f"{kind}_{dataset}_{protocol.protocol_hash[:12]}.png"


def per_block_curves(entry, protocol) -> tuple[str, dict[int, object]]:
    """The per-block curve of ``entry`` drawn in the overlay: the results of the variant (k, stream) in which the
    per-block evaluator chose the row's best block (its headline), one per block. Returns (the variant's text,
    ``{block: Result}``); empty without a per-block headline."""
    from sslbench.core.evaluator import format_variant

    chosen = next((r for r in protocol.headlines.get(entry.name, {}).values() if r.evaluator == "per_block"), None)
    if chosen is None:
        return "", {}
    variant = {k: v for k, v in chosen.fields.items() if k != "block"}
    curve = {r.fields["block"]: r for r in entry.results.values()
             if r.evaluator == "per_block" and r.metric == chosen.metric and isinstance(r.fields.get("block"), int)
             and {k: v for k, v in r.fields.items() if k != "block"} == variant and math.isfinite(r.mean)}
    return format_variant(variant), dict(sorted(curve.items()))


def plot_protocol_per_block(protocol, path: str | os.PathLike) -> Path | None:
    """All rows' per-block curves of one protocol on one axes, with interval bands; ``None`` without per-block rows."""
    curves = [(entry.name, *per_block_curves(entry, protocol)) for entry in protocol.entries]
    curves = [(name, what, blocks) for name, what, blocks in curves if blocks]
    if not curves:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    try:
        for name, _, blocks in curves:
            x = list(blocks)
            y = [blocks[b].mean for b in x]
            line, = axes.plot(x, y, marker="o", markersize=3, label=name)
            low = [blocks[b].interval.low if blocks[b].interval else math.nan for b in x]
            high = [blocks[b].interval.high if blocks[b].interval else math.nan for b in x]
            if not all(math.isnan(v) for v in low):
                axes.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axes.set_xticks(sorted({b for _, _, blocks in curves for b in blocks}))
        return _finish_curves(figure, axes, path, "block (0 = first)", "k-NN top-1 (%)",
                              f"{protocol.title}: k-NN per block ({curves[0][1]}); bands: 95% intervals")
    finally:
        plt.close(figure)


def _finish_curves(figure, axes, path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid, the legend outside the axes on the right (row names are long), and the file."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return save_figure(figure, Path(path))


def learning_curves(protocol) -> list[tuple[str, list[list[tuple[float, float]]]]]:
    """``[(row name, [curve of each seed, ...]), ...]``: the monitor curves
    (:func:`sslbench.results.plots.monitor_curve`) of the protocol's rows that have any. A run appears once, under its
    last row: the EMA rows and the rows of earlier stages (``run.evaluate = "each_stage"``) share its log."""
    from sslbench.results.plots import monitor_curve

    by_runs: dict[tuple, tuple[str, list]] = {}
    for entry in protocol.entries:
        if entry.ema:
            continue
        runs = tuple(sorted(str(d) for d in entry.run_dirs.values()))
        curves = [monitor_curve(entry.run_dirs[seed]) for seed in sorted(entry.run_dirs)]
        curves = [c for c in curves if c]
        if curves:
            by_runs[runs] = (entry.name, curves)
    return list(by_runs.values())


def plot_protocol_learning(protocol, path: str | os.PathLike) -> Path | None:
    """The online k-NN top-1 of every row against epoch on one axes, its seeds in one colour; ``None`` (nothing
    written) when no run of the protocol logged monitor lines."""
    rows = learning_curves(protocol)
    if not rows:
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    try:
        for i, (name, curves) in enumerate(rows):
            for j, curve in enumerate(curves):
                x, y = zip(*curve)
                axes.plot(x, y, marker="o", markersize=3, color=f"C{i % 10}", alpha=0.9 if len(curves) == 1 else 0.7,
                          label=name + (f" ({len(curves)} seeds)" if len(curves) > 1 else "") if j == 0 else None)
        return _finish_curves(figure, axes, path, "epoch (a later stage continues the count)",
                              "online k-NN top-1 (%)",
                              f"{protocol.title}: online k-NN during training ([monitor] subset)")
    finally:
        plt.close(figure)


def value_axis(lows: list[float], highs: list[float]) -> tuple[float, float, bool]:
    """The axis range of a panel and whether it is zoomed: 0–100 (or 0 to the largest value) unless everything lies
    in less than a quarter of that, then the values with a margin of half their spread (at least 1 point)."""
    low, high = min(lows), max(highs)
    full_top = max(100.0, high) if high <= 100 else high * 1.05
    if high - low >= 0.25 * full_top:
        return 0.0, full_top, False
    margin = max(1.0, 0.5 * (high - low))
    return max(0.0, low - margin), min(full_top, high + margin), low - margin > 0


def plot_protocol_headline(protocol, path: str | os.PathLike) -> Path | None:
    """Dots with 95% error bars, one panel per headline metric, one row per leaderboard row; ``None`` without
    headline values."""
    labels = [label for label in protocol.labels if label not in protocol.shown_fields]
    if not labels:
        return None
    names = [e.name for e in protocol.entries]
    columns = min(3, len(labels))                      # panels wrap in rows of three: readable on a page
    rows = math.ceil(len(labels) / columns)
    plt = pyplot()
    figure, panels = plt.subplots(rows, columns, figsize=(3.4 * columns + 2.2, rows * (0.32 * len(names) + 1.3)),
                                  sharey=True, squeeze=False)
    try:
        for extra in panels.flat[len(labels):]:
            extra.set_visible(False)
        for axes, label in zip(panels.flat, labels):
            lows, highs = [], []
            for i, entry in enumerate(protocol.entries):
                result = protocol.headlines.get(entry.name, {}).get(label)
                if result is None or not math.isfinite(result.mean):
                    continue                                # no dot for a missing or non-finite value
                value, interval = result.mean, result.interval
                error = [[value - interval.low], [interval.high - value]] if interval else None
                axes.errorbar([value], [i], xerr=error, fmt="o", color=f"C{i % 10}", capsize=3, markersize=5)
                lows.append(interval.low if interval else value)
                highs.append(interval.high if interval else value)
            if lows:
                start, stop, zoomed = value_axis(lows, highs)
                axes.set_xlim(start, stop)
                axes.set_xlabel(f"%  (zoomed: axis starts at {start:.0f}, not 0)" if zoomed else "%", fontsize=7)
            axes.set_title(label, fontsize=9)
            axes.grid(axis="x", alpha=0.3)
        for row in panels:
            row[0].set_yticks(range(len(names)))
            row[0].set_yticklabels(names, fontsize=8)
        panels[0][0].set_ylim(len(names) - 0.5, -0.5)          # first row on top (shared by every panel)
        figure.suptitle(f"{protocol.title}: headline metrics, 95% intervals", fontsize=9)
        figure.tight_layout()
        return save_figure(figure, Path(path))
    finally:
        plt.close(figure)


#: The figures of a protocol, in the order a page shows them: (file-name kind, drawing function).
FIGURES = (("headline", plot_protocol_headline), ("per_block", plot_protocol_per_block),
           ("learning", plot_protocol_learning))


def write_board_plots(board, out_dir: str | os.PathLike) -> list[Path]:
    """The figures of every protocol into ``out_dir``, and the figures that are no longer drawn removed (only files
    of these kinds: other files in ``out_dir`` are left alone). Returns the written paths."""
    out_dir = Path(out_dir)
    written = []
    for protocol in board.protocols:
        for kind, draw in FIGURES:
            path = draw(protocol, out_dir / plot_name(kind, protocol))
            if path is not None:
                written.append(path)
    if out_dir.is_dir():
        for stale in (path for kind, _ in FIGURES for path in out_dir.glob(f"{kind}_*.png")):
            if stale not in written:
                stale.unlink()
    return written
