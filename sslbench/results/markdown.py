"""The leaderboard as Markdown a reader can use: short lines, one section per protocol, intervals on every number.

Written by hand rather than with ``DataFrame.to_markdown`` to avoid a dependency on ``tabulate``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from sslbench.results.aggregate import Entry, Result
from sslbench.results.budget import format_budget
from sslbench.results.compare import format_p
from sslbench.results.statistics import Interval

__all__ = ["leaderboard_markdown", "details_markdown", "format_value", "headline_cell", "short_start", "table"]

#: Entries per detail table: keeps its lines under ~200 characters.
DETAIL_COLUMNS = 6

INTRODUCTION = """\
Each section holds the rows of one dataset and evaluation protocol (the hash of the evaluation data, preprocessing
and evaluators with their options); rows of different protocols are never compared. A cell is `mean ± half-width`
of the 95% interval: over seeds when a row has several, else over the test samples (exact Clopper–Pearson for an
accuracy, bootstrap for a mean of fractions, jackknife for NMI); a value alone has no per-sample record. ▲ / ▼:
significantly above / below the row's base (the checkpoint it started from) — or the protocol's baseline when there
is no tested base — at 95%, by a paired test over test samples and, with several seeds, a test over seeds. How each
is computed: `docs/statistics.md`. Every result of every row: `leaderboard_details.md` and `leaderboard_long.csv`.
"""


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]], numeric: list[bool] | None = None) -> str:
    """A GitHub Markdown table; ``numeric`` columns right-aligned."""
    numeric = numeric or [False] * len(header)
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |",
             "|" + "".join(" ---: |" if n else " --- |" for n in numeric)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_value(value: float, interval: Interval | None = None) -> str:
    """``80.9 ± 0.8``: one decimal — two while the half-width is below 0.1, where the second decimal still means
    something; the value alone (two decimals) without an interval."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if interval is None or math.isnan(interval.half_width):
        return f"{value:.2f}"
    digits = 2 if interval.half_width < 0.1 else 1
    return f"{value:.{digits}f} ± {interval.half_width:.{digits}f}"


def short_start(entry: Entry) -> str:
    """Where training started, short: ``scratch``, the run that wrote the checkpoint, or the file's name."""
    if entry.start in ("", "scratch"):
        return "scratch"
    parts = Path(entry.start).parts
    if "checkpoints" in parts and parts.index("checkpoints") > 0:
        return parts[parts.index("checkpoints") - 1]
    return Path(entry.start).name


def headline_cell(protocol, entry: Entry, label: str) -> str:
    result: Result | None = protocol.headlines.get(entry.name, {}).get(label)
    if result is None:
        return ""
    shown = protocol.shown_fields.get(label)
    if shown:
        blocks = [r.fields.get(shown) for r in entry.results.values()
                  if r.evaluator == result.evaluator and isinstance(r.fields.get(shown), int)]
        total = f" of {max(blocks) + 1}" if blocks else ""
        return f"{result.fields.get(shown)}{total} ({result.mean:.1f})"
    mark = protocol.mark(entry, label)
    return format_value(result.mean, result.interval) + (f" {mark}" if mark else "")


def run_folders(entry: Entry) -> str:
    """``digits_mae-seed{0,1,2}`` for the seeds of one recipe, else the folder names."""
    names = [entry.runs[s] for s in sorted(entry.runs)]
    matches = [re.fullmatch(r"(.+)-seed(\d+)", n) for n in names]
    if len(names) > 1 and all(matches) and len({m.group(1) for m in matches}) == 1:
        return f"{matches[0].group(1)}-seed{{{','.join(m.group(2) for m in matches)}}}"
    return ", ".join(names)


def evaluators_of(protocol) -> list[str]:
    """The evaluators whose results a protocol's rows hold, in the order they ran."""
    return list(dict.fromkeys(r.evaluator for e in protocol.entries for r in e.results.values()))


def _protocol_section(protocol) -> str:
    backbones = sorted({e.key["backbone"] for e in protocol.entries})
    lines = [f"## {protocol.title}\n"]
    lines.append(f"Backbone: `{backbones[0]}`." if len(backbones) == 1 else
                 f"Backbones: {', '.join(f'`{b}`' for b in backbones)}.")
    lines.append(f"Evaluators: {', '.join(evaluators_of(protocol))}." + (
        f" Baseline: **{protocol.baseline.name}**." if protocol.baseline is not None else ""))
    lines.append("")
    header = ["run", "objective", "from", "seeds", "budget", *protocol.labels]
    rows = [[e.name, e.key["objective"], short_start(e), str(e.seeds), format_budget(protocol.budgets.get(e.name)),
             *[headline_cell(protocol, e, label) for label in protocol.labels]] for e in protocol.entries]
    lines.append(table(header, rows, [False, False, False, True, False, *[True] * len(protocol.labels)]))
    if protocol.comparisons:
        lines.append("Differences (row − the row it is compared with, percentage points; bold: significant at 95%):\n")
        rows = []
        for c in protocol.comparisons:
            delta = f"{c.difference:+.2f}"
            ci = f"[{c.low:+.2f}, {c.high:+.2f}]" if c.low is not None and c.high is not None else ""
            rows.append([c.entry, f"{c.relation} {c.against}", c.label, f"**{delta}**" if c.significant else delta,
                         ci, format_p(c.p_value), c.method])
        lines.append(table(["run", "vs", "metric", "Δ", "95% CI of Δ", "p", "test"], rows,
                           [False, False, False, True, True, True, False]))
    rows = [[e.name, run_folders(e), e.recipe_hash, e.hardware, e.versions] for e in protocol.entries]
    lines.append("Runs:\n")
    lines.append(table(["run", "run folders", "recipe hash (latest)", "hardware", "versions"], rows))
    return "\n".join(lines)


def leaderboard_markdown(board) -> str:
    """``leaderboard.md``: the introduction, then per protocol the headline table, differences and runs."""
    if not board.protocols:
        return "# sslbench leaderboard\n\nNo runs yet.\n"
    contents = [f"- [{p.title}](#{_anchor(p.title)}): {len(p.entries)} rows" for p in board.protocols]
    return "\n".join(["# sslbench leaderboard\n", INTRODUCTION, *contents, "",
                      *[_protocol_section(p) for p in board.protocols]])


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def details_markdown(board) -> str:
    """``leaderboard_details.md``: per protocol and evaluator, every result (rows) of every entry (columns)."""
    lines = ["# sslbench leaderboard: every result\n",
             "Cells as in `leaderboard.md` (`mean ± half-width of the 95% interval`, when one is known).\n"]
    for protocol in board.protocols:
        lines.append(f"## {protocol.title}\n")
        for evaluator in evaluators_of(protocol):
            columns = list(dict.fromkeys(r.column for e in protocol.entries for r in e.results.values()
                                         if r.evaluator == evaluator))
            for start in range(0, len(protocol.entries), DETAIL_COLUMNS):
                entries = protocol.entries[start:start + DETAIL_COLUMNS]
                rows = []
                for column in columns:
                    cells = []
                    for entry in entries:
                        result = next((r for r in entry.results.values() if r.column == column), None)
                        cells.append(format_value(result.mean, result.interval) if result else "")
                    rows.append([column.split("/", 1)[1], *cells])
                lines.append(f"### {evaluator}" + (f" ({start // DETAIL_COLUMNS + 1})"
                                                   if len(protocol.entries) > DETAIL_COLUMNS else "") + "\n")
                lines.append(table(["result", *[e.name for e in entries]], rows,
                                   [False, *[True] * len(entries)]))
    return "\n".join(lines)
