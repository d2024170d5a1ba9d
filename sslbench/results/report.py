"""``sslbench report``: the leaderboard as one self-contained static HTML page, written next to it.

Everything is in the one file — styles, the few lines of script that sort a table when its header is clicked, and
the figures as ``data:`` URIs — so the page can be mailed, attached to a pull request or opened from a laptop
without a server. Each row links to its run's resolved recipe, log and metrics (relative links, valid while the
page stays beside the run folders).
"""

from __future__ import annotations

import base64
import html
import os
from datetime import datetime, timezone
from pathlib import Path

from sslbench.results.board_plots import FIGURES, plot_name
from sslbench.results.budget import format_budget
from sslbench.results.compare import format_p
from sslbench.results.markdown import INTRODUCTION, evaluators_of, format_value, headline_cell, short_start

__all__ = ["render_report", "write_report"]

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 96em; padding: 0 1em; color: #222; }
.scroll { overflow-x: auto; }
h1 { font-size: 1.6em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 13px; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #e3e3e3; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.sortable { cursor: pointer; user-select: none; } th.sortable::after { content: " \\2195"; color: #999; }
th[aria-sort="ascending"]::after { content: " \\2191"; color: #222; }
th[aria-sort="descending"]::after { content: " \\2193"; color: #222; }
.sig { font-weight: 600; } img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #555; font-size: 13px; } details { margin: 0.6em 0 1.2em; } code { font-size: 12px; }
.files { white-space: nowrap; font-size: 12px; } .budget { white-space: nowrap; } .hardware { font-size: 11px; color: #666; }
"""

# Sorting: numbers by their leading value ("80.9 ± 0.8 ▲" sorts as 80.9), text alphabetically, empty cells last.
SCRIPT = """
function cellKey(cell) {
  const text = cell.textContent.trim();
  const number = parseFloat(text.replace(/^[^0-9.+-]*/, ""));
  return { empty: text === "", number: isNaN(number) ? null : number, text: text.toLowerCase() };
}
function sortTable(table, column, header) {
  const body = table.tBodies[0];
  const ascending = header.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th").forEach(th => th.removeAttribute("aria-sort"));
  header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellKey(a.cells[column]), y = cellKey(b.cells[column]);
    if (x.empty !== y.empty) return x.empty ? 1 : -1;
    const order = (x.number !== null && y.number !== null) ? x.number - y.number : x.text.localeCompare(y.text);
    return ascending ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
}
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("th").forEach((header, column) => {
    header.classList.add("sortable");
    header.addEventListener("click", () => sortTable(table, column, header));
  });
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[str]], numeric: list[bool], sortable: bool = True,
           table_id: str = "") -> str:
    """Rows of already escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
                                    for c, n in zip(row, numeric)) + "</tr>\n" for row in rows)
    attributes = (' class="sortable"' if sortable else "") + (f' id="{_e(table_id)}"' if table_id else "")
    return f'<div class="scroll"><table{attributes}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table></div>'


def _image(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _run_links(entry, page_dir: Path) -> str:
    links = []
    for seed in sorted(entry.run_dirs):
        run_dir = Path(entry.run_dirs[seed])
        files = [(name, label) for name, label in (("recipe.toml", "recipe"), ("recipe.json", "json"),
                                                   ("log.jsonl", "log"), ("metrics.csv", "metrics"))
                 if (run_dir / name).is_file()]
        target = Path(os.path.relpath(run_dir, page_dir)).as_posix()
        anchors = " · ".join(f'<a href="{_e(target + "/" + name)}" title="{_e(entry.runs[seed] + "/" + name)}">'
                             f'{label}</a>' for name, label in files)
        links.append(f'<span class="files">seed {seed}: {anchors}</span>')
    return "<br>".join(links)


def _protocol_html(protocol, page_dir: Path, plots_dir: Path, drawn: list[Path] | None) -> str:
    parts = [f'<h2 id="{_e(protocol.protocol_hash[:12])}">{_e(protocol.title)}</h2>']
    backbones = sorted({e.key["backbone"] for e in protocol.entries})
    baseline = f" Baseline: <b>{_e(protocol.baseline.name)}</b>." if protocol.baseline is not None else ""
    parts.append(f'<p class="note">Backbone{"s" if len(backbones) > 1 else ""}: '
                 f'{", ".join(f"<code>{_e(b)}</code>" for b in backbones)}. '
                 f'Evaluators: {_e(", ".join(evaluators_of(protocol)))}.{baseline}</p>')
    header = ["run", "objective", "from", "seeds", "budget", *protocol.labels, "files"]
    rows = [[_e(e.name), _e(e.key["objective"]), _e(short_start(e)), str(e.seeds),
             f'<span class="budget" title="{_e(e.hardware)}">{_e(format_budget(protocol.budgets.get(e.name)))}'
             f'</span><br><span class="hardware">{_e(e.hardware)}</span>',
             *[_e(headline_cell(protocol, e, label)) for label in protocol.labels], _run_links(e, page_dir)]
            for e in protocol.entries]
    numeric = [False, False, False, True, False, *[True] * len(protocol.labels), False]
    parts.append(_table(header, rows, numeric, table_id=f"headline-{protocol.protocol_hash[:12]}"))
    figures = []
    for kind, draw in FIGURES:
        path = plots_dir / plot_name(kind, protocol)
        figures.append((kind, draw(protocol, path) if drawn is None else (path if path in drawn else None)))
    parts += [_image(path, f"{protocol.title} {kind} figure") for kind, path in figures if path is not None]
    if protocol.comparisons:
        rows = []
        for c in protocol.comparisons:
            delta = f"{c.difference:+.2f}"
            ci = f"[{c.low:+.2f}, {c.high:+.2f}]" if c.low is not None and c.high is not None else ""
            rows.append([_e(c.entry), _e(f"{c.relation} {c.against}"), _e(c.label),
                         f'<span class="sig">{delta}</span>' if c.significant else delta, ci, format_p(c.p_value),
                         "yes" if c.significant else "no", _e(c.method)])
        parts.append("<h3>Differences (percentage points)</h3>")
        parts.append(_table(["run", "vs", "metric", "Δ", "95% CI of Δ", "p", "significant", "test"], rows,
                            [False, False, False, True, True, True, False, False]))
    parts.append("<details><summary>Every result of every row</summary>")
    columns = list(dict.fromkeys(r.column for e in protocol.entries for r in e.results.values()))
    rows = []
    for column in columns:
        cells = []
        for entry in protocol.entries:
            result = next((r for r in entry.results.values() if r.column == column), None)
            cells.append(_e(format_value(result.mean, result.interval)) if result else "")
        rows.append([_e(column), *cells])
    parts.append(_table(["result", *[e.name for e in protocol.entries]], rows,
                        [False, *[True] * len(protocol.entries)]))
    parts.append("</details>")
    rows = [[_e(e.name), _e(e.recipe_hash), _e(e.hardware), _e(e.versions), _e(e.timestamp[:19])]
            for e in protocol.entries]
    parts.append("<h3>Runs</h3>" + _table(["run", "recipe", "hardware", "versions", "evaluated (UTC)"], rows,
                                          [False] * 5))
    return "\n".join(parts)


def render_report(board, page_dir: str | os.PathLike, plots_dir: str | os.PathLike,
                  drawn: list[Path] | None = None) -> str:
    """The page's HTML with the figures embedded: ``drawn``, the figures just written into ``plots_dir`` by
    :func:`sslbench.results.board_plots.write_board_plots`, or (``None``) drawn into ``plots_dir`` now."""
    page_dir, plots_dir = Path(page_dir), Path(plots_dir)
    intro = " ".join(INTRODUCTION.replace("`", "").split()).replace("leaderboard_details.md and leaderboard_long.csv",
                                                   "the folded tables below and leaderboard_long.csv")
    contents = "".join(f'<li><a href="#{_e(p.protocol_hash[:12])}">{_e(p.title)}</a> ({len(p.entries)} rows)</li>'
                       for p in board.protocols)
    body = "\n".join(_protocol_html(p, page_dir, plots_dir, drawn) for p in board.protocols) or "<p>No runs yet.</p>"
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>sslbench leaderboard</title><style>{STYLE}</style></head><body>\n"
            f"<h1>sslbench leaderboard</h1>\n<p class=\"note\">{_e(intro)} Click a column header to sort. "
            f"Made {made}.</p>\n<ul>{contents}</ul>\n{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def write_report(board, out_dir: str | os.PathLike, drawn: list[Path] | None = None) -> Path:
    """``report.html`` in ``out_dir`` (figures kept in ``out_dir/plots``; ``drawn``: see :func:`render_report`);
    atomic. Returns its path."""
    from sslbench.core.io import atomic_write_text

    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    atomic_write_text(path, render_report(board, out_dir, out_dir / "plots", drawn))
    return path
