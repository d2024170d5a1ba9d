"""The README.md of an exported model: Hub front matter, what was trained how, its headline results, how to load it.

Everything comes from what sslbench recorded: the run's resolved recipe (objective chain, base checkpoint, data,
seed, recipe hash), the headline results of its ``metrics.csv`` as the leaderboard picks them (each evaluator's
``headlines``, with the interval where the run kept per-sample predictions) and the versions involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CardFacts", "Headline", "headlines", "model_card"]


@dataclass
class Headline:
    """One headline result: ``value`` in percent, ``interval`` as text (``""`` when the run kept none)."""

    dataset: str
    label: str
    value: str
    interval: str
    variant: str


@dataclass
class CardFacts:
    """What the card says. ``recipe`` is the resolved recipe (``None`` when only a checkpoint file was given)."""

    name: str
    architecture: str
    model_args: dict[str, Any]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    weights: str                       # "raw" or "ema"
    source: str                        # the checkpoint file exported
    source_format: str
    license: str
    versions: dict[str, str]
    recipe: dict | None = None
    recipe_hash: str | None = None
    trained_with: str | None = None    # the sslbench version of the run, from its recipe.json
    repo_id: str | None = None
    results: list[Headline] = field(default_factory=list)
    results_note: str = ""
    notes: list[str] = field(default_factory=list)


def headlines(run_dir: Path, weights: str, stage: str | None) -> tuple[list[Headline], str]:
    """The headline results in ``run_dir/metrics.csv`` of the exported weights (EMA rows for ``weights="ema"``,
    the others for ``"raw"``) after ``stage`` (the last one; all stages when ``None``), and a note when there are
    none."""
    from sslbench.results.leaderboard import build
    from sslbench.results.metrics import read_metrics

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return [], f"{run_dir.name} has no metrics.csv (no [[eval]] in its recipe, or it has not been evaluated)."
    frame = read_metrics(path)
    if frame.empty:
        return [], "metrics.csv holds no results."
    frame["run_dir"] = str(run_dir)
    out: list[Headline] = []
    for protocol in build(frame).protocols:
        for entry in protocol.entries:
            is_ema = entry.key["checkpoint"].endswith(" (ema)")
            if is_ema != (weights == "ema") or (stage is not None and entry.key["stage"] != stage):
                continue
            for label, result in protocol.headlines.get(entry.name, {}).items():
                shown = protocol.shown_fields.get(label)
                if shown:
                    value = f"{shown} {result.fields.get(shown)} ({result.metric} {result.mean:.2f}%)"
                else:
                    value = f"{result.mean:.2f}%"
                interval = result.interval
                text = (f"{interval.low:.1f}–{interval.high:.1f} ({interval.method})"
                        if interval is not None and not shown else "")
                out.append(Headline(protocol.dataset, label, value, text, result.variant))
    note = "" if out else (f"metrics.csv holds no results of the {weights} weights"
                           + (f" after stage {stage!r}." if stage else "."))
    return out, note


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _recipe_lines(recipe: dict) -> list[str]:
    stages = [s for s in recipe.get("stages", []) if isinstance(s, dict)]
    chain: list[str] = []
    for stage in stages:
        if not chain or chain[-1] != stage.get("objective"):
            chain.append(str(stage.get("objective")))
    backbone, data, run = recipe.get("backbone", {}), recipe.get("data", {}), recipe.get("run", {})
    base = backbone.get("checkpoint")
    base_text = f"`{base}` (format `{backbone.get('checkpoint_format')}`)" if base else "none (trained from scratch)"

    def dataset(table: Any) -> str:
        if not isinstance(table, dict):
            return "—"
        extra = ", ".join(f"{k}={v}" for k, v in table.items() if k != "source" and v is not None)
        return f"`{table.get('source')}`" + (f" ({extra})" if extra else "")

    lines = [f"- **Objective chain:** `{'+'.join(chain) or '—'}`",
             f"- **Base checkpoint:** {base_text}",
             f"- **Pre-training data:** {dataset(data.get('train'))}",
             f"- **Evaluation data:** {dataset(data.get('test'))}",
             f"- **Seed:** {run.get('seed', '—')}"]
    for i, stage in enumerate(stages):
        length = f"{stage['epochs']} epochs" if stage.get("epochs") is not None else f"{stage.get('steps')} steps"
        lines.append(f"- **Stage {i} `{stage.get('name')}`:** `{stage.get('objective')}`, {length}, batch "
                     f"{stage.get('batch_size')}, lr {stage.get('optimizer', {}).get('lr')}"
                     + (f", EMA momentum {stage['ema_momentum']}" if stage.get("ema_momentum") else ""))
    return lines


def model_card(facts: CardFacts) -> str:
    """The README.md text."""
    f = facts
    front = ["---", "library_name: timm", f"license: {f.license}", "tags:", "- image-feature-extraction",
             "- timm", "- sslbench", "---", ""]
    c, h, w = f.input_size
    weights_words = ("the exponential moving average (EMA) of the encoder" if f.weights == "ema"
                     else "the encoder as trained (raw weights, not an EMA)")
    lines = front + [
        f"# {f.name}",
        "",
        f"A self-supervised Vision Transformer (timm `{f.architecture}` with the arguments below) exported by "
        f"sslbench from `{f.source}` (format `{f.source_format}`). It is a feature "
        f"extractor: `num_classes = 0`, no classification head. The weights are {weights_words}.",
        "",
        "## Model",
        "",
        f"- **Architecture:** `{f.architecture}`, `model_args` = `{json.dumps(f.model_args)}`",
        f"- **Input:** {c} channel(s), {h}×{w} px, resized whole (bicubic, no crop) and normalised with "
        f"mean {f.mean}, std {f.std}",
        f"- **Weights:** `{f.weights}`",
    ]
    if f.recipe_hash:
        lines.append(f"- **Recipe hash:** `{f.recipe_hash}`")
    if f.recipe:
        lines += ["", "## Training", ""] + _recipe_lines(f.recipe)
    lines += ["", "## Results", ""]
    if f.results:
        lines += ["Headline results of these weights in the run's `metrics.csv` (as sslbench's leaderboard "
                  "picks them; intervals are 95% where the run kept per-sample predictions):", "",
                  "| Dataset | Result | Value | 95% interval | Variant |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(r.dataset)} | {_cell(r.label)} | {_cell(r.value)} | {_cell(r.interval or '—')} | "
                  f"{_cell(r.variant)} |" for r in f.results]
    else:
        lines.append(f.results_note or "No results recorded with these weights.")
    name = f"hf-hub:{f.repo_id}" if f.repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    lines += ["", "## Use with timm", "", "No sslbench needed:", "", "```python", "import timm", "import torch", "",
              f'model = timm.create_model("{name}", pretrained=True).eval()',
              "config = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**config)  # for PIL images", "",
              "with torch.no_grad():",
              f"    tokens = model.forward_features(torch.randn(1, {c}, {h}, {w}))  # (1, 1 + patches, dim), "
              "final norm applied",
              "    cls = model.forward_head(tokens)                      # (1, dim): the normed CLS token",
              "```", "",
              "`forward_features` returns every token after the final norm, exactly what sslbench's backbone "
              "computes (the CLS token first); `model(x)` returns the normed CLS token, the feature sslbench's "
              "k-NN and linear probes use by default."]
    if f.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in f.notes]
    versions = ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in f.versions.items())
    lines += ["", "## Versions", "", f"- Exported with {versions}."]
    if f.trained_with:
        lines.append(f"- Trained with sslbench {f.trained_with}.")
    if f.recipe:
        lines += ["", "<details><summary>Resolved recipe (recipe.json)</summary>", "", "```json",
                  json.dumps(f.recipe, indent=2), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
