"""`sslbench export RUN_OR_CHECKPOINT --to DIR`: a backbone as a folder plain timm loads, optionally pushed to the Hub.

The folder holds ``model.safetensors`` and ``config.json`` in timm's Hub layout (see
:mod:`sslbench.core.timm_export`) and a ``README.md`` model card (:mod:`sslbench.results.model_card`), so that
``timm.create_model("local-dir:DIR", pretrained=True)`` — or, once pushed with ``--push-to-hub REPO``,
``timm.create_model("hf-hub:REPO", pretrained=True)`` — rebuilds the backbone without sslbench.

What is exported:

* a **run folder**: its ``checkpoints/backbone.pt``; the recipe (``recipe.json``) gives the data normalisation and
  the card's facts, ``metrics.csv`` the card's headline results;
* a **checkpoint file**: an sslbench ``backbone.pt`` carries its backbone recipe (and, inside a run's
  ``checkpoints/`` folder, that run's recipe and metrics are used as for the run folder); any other format (``timm``,
  ``mae``, ``data2vec2``, a plugin's) needs ``--recipe RECIPE`` for the architecture and the normalisation.
  ``--format`` and ``--trust-checkpoint`` work as in ``sslbench eval``.

``--weights raw`` (the default) exports the encoder as trained — what ``sslbench eval`` and downstream recipes load
from a ``backbone.pt`` by default, and what the run's ``[[eval]]`` rows score unless they set ``use_ema``;
``--weights ema`` exports the EMA the run kept (refused when it kept none). The choice is recorded in ``config.json``
(``sslbench.weights``) and in the card, whose results are those of the chosen weights.

Everything that can fail (unreadable input, an architecture plain timm cannot express, a non-empty ``DIR``) fails
before anything is written; the folder is built beside ``DIR`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError

WEIGHTS = ("raw", "ema")
_SIZES = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sslbench export`` (the CLI adds the subparser)."""
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (uses checkpoints/backbone.pt) or a checkpoint file")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write (must be empty or absent)")
    p.add_argument("--weights", choices=WEIGHTS,
                   help="raw: the encoder as trained (default); ema: the EMA the run kept")
    p.add_argument("--recipe", help="recipe for the architecture and normalisation of a non-sslbench checkpoint "
                                    "(overrides the run's recipe for the normalisation and the card)")
    p.add_argument("--format", help="checkpoint format, as for sslbench eval (default: sslbench for a backbone.pt, "
                                    "else the recipe's)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow the checkpoint to unpickle Python objects besides tensors (runs code from the file)")
    p.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export")
    p.add_argument("--license", default="other",
                   help="license in the card's front matter (default: other — the weights inherit the terms of "
                        "the training data and base checkpoint)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this Hugging Face Hub model "
                                                         "repository (created if needed; token from HF_TOKEN or "
                                                         "`hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def export_command(args: argparse.Namespace) -> int:
    export_model(args.source, args.to, weights=args.weights, recipe=args.recipe, fmt=args.format,
                 trust_checkpoint=args.trust_checkpoint, force=args.force, license=args.license,
                 push_to_hub=args.push_to_hub, private=args.private)
    return 0


# --- what is exported --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Source:
    """The checkpoint file, its format and weights, the backbone section to build, and the run it came from."""

    def __init__(self, source: str, *, weights: str | None, recipe_path: str | None, fmt: str | None, registry):
        path = Path(source)
        self.run_dir: Path | None = None
        self.run_meta: dict | None = None
        if path.is_dir():
            meta = _read_json(path / "recipe.json")
            if meta is None or not isinstance(meta.get("recipe"), dict):
                raise UserError(f"{path}: not an sslbench run folder (no readable recipe.json); give a run folder "
                                "or a checkpoint file")
            if "evaluated_checkpoint" in meta:
                evaluated = meta["evaluated_checkpoint"].get("path")
                raise UserError(f"{path}: an `sslbench eval` folder, which trained nothing; export the checkpoint "
                                f"it evaluated instead ({evaluated})")
            checkpoint = path / "checkpoints" / "backbone.pt"
            if not checkpoint.is_file():
                raise UserError(f"{path}: no checkpoints/backbone.pt — the run has not finished training, or its "
                                "checkpoints were not kept (published runs have none)")
            self.run_dir, self.run_meta, path = path, meta, checkpoint
        elif path.is_file():
            from sslbench.commands.eval import source_run

            self.run_meta = source_run(path)
            if self.run_meta is not None and "evaluated_checkpoint" not in self.run_meta:
                self.run_dir = path.resolve().parent.parent
            else:
                self.run_meta = None
        else:
            raise UserError(f"{source}: no such run folder or checkpoint file")
        self.path = path

        self.recipe: dict | None = self.run_meta["recipe"] if self.run_meta else None
        if recipe_path is not None:
            from sslbench.training.recipe import load_recipe

            self.recipe = load_recipe(recipe_path, registry, check_files=False).as_dict()
        from sslbench.commands.eval import sslbench_header

        header = sslbench_header(path) if fmt in (None, "sslbench", "sslbench_ema") else None
        fmt = fmt or ("sslbench" if header is not None else None)
        if fmt is None:
            if recipe_path is None:
                raise UserError(f"{path}: not an sslbench backbone.pt, so its architecture is unknown; pass "
                                "--recipe RECIPE (the backbone it was trained with) and, if needed, --format")
            fmt = self.recipe["backbone"]["checkpoint_format"]
        registry.get("checkpoint_format", fmt)  # an unknown name: one line listing the known ones

        if fmt in ("sslbench", "sslbench_ema"):
            if header is None:
                raise UserError(f"{path}: not an sslbench backbone.pt (no 'format': 'sslbench' entry, or "
                                f"unreadable as a weights-only torch file); pass its real --format and --recipe")
            if fmt == "sslbench_ema" and weights == "raw":
                raise UserError("--format sslbench_ema and --weights raw contradict each other")
            weights = "ema" if fmt == "sslbench_ema" else (weights or "raw")
            fmt = "sslbench_ema" if weights == "ema" else "sslbench"
            if weights == "ema" and not isinstance(header.get("ema"), dict):
                raise UserError(f"{path}: holds no EMA weights (its run trained without ema_momentum); export the "
                                "raw weights (--weights raw)")
            backbone = header.get("backbone_recipe")
            if not isinstance(backbone, dict):
                if recipe_path is None:
                    raise UserError(f"{path}: records no backbone recipe; pass --recipe RECIPE")
                backbone = self.recipe["backbone"]
            self.recipe_hash = header.get("recipe_hash") or (self.run_meta or {}).get("recipe_hash")
        else:
            if weights == "ema":
                raise UserError(f"--weights ema: only for an sslbench backbone.pt; a {fmt!r} checkpoint holds one "
                                "set of weights")
            if recipe_path is None:
                raise UserError(f"{path}: a {fmt!r} checkpoint does not say its architecture; pass --recipe RECIPE")
            weights = "raw"
            # built as `sslbench eval` builds it: the recipe's sizes plus what the format implies
            backbone = {**self.recipe["backbone"], "checkpoint": str(path), "checkpoint_format": fmt}
            self.recipe_hash = None
        self.fmt, self.weights, self.backbone = fmt, weights, backbone

    def build(self, registry):
        """The backbone with random weights (the checkpoint is loaded by :meth:`load`, after the checks)."""
        from sslbench.core.backbone import build_backbone

        spec = self.backbone
        kwargs = {k: spec.get(k) for k in _SIZES}
        kwargs["pos_embed"] = spec.get("pos_embed", "learned")
        kwargs["model_args"] = dict(spec.get("model_args") or {})
        if spec.get("checkpoint"):
            kwargs.update(registry.get("checkpoint_format", spec.get("checkpoint_format", "timm")).factory.architecture)
        return build_backbone(spec["model"], **kwargs)

    def load(self, backbone, registry, trust: bool) -> None:
        from sslbench.core.checkpoints import UntrustedPickle, load_checkpoint

        try:
            load_checkpoint(backbone, self.path, registry.get("checkpoint_format", self.fmt).factory,
                            allow_pickle=trust)
        except UntrustedPickle as exc:
            raise UserError(f"{exc.path}: pickles Python objects besides tensors ({exc.found}), and loading it "
                            "would run code from the file; if you trust its source, pass --trust-checkpoint") from None

    @property
    def name(self) -> str:
        if self.run_dir is not None:
            return self.run_dir.name + ("-ema" if self.weights == "ema" else "")
        return self.path.stem


def _normalisation(recipe: dict | None, channels: int) -> tuple[list[float], list[float], int | None]:
    from sslbench.data.transforms import normalization_stats

    data = (recipe or {}).get("data") or {}
    mean, std = data.get("mean"), data.get("std")
    mean, std = normalization_stats(channels, mean if mean and std else None, std if mean and std else None)
    return list(mean), list(std), data.get("image_size")


def _check_destination(to: Path, force: bool) -> None:
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to}: exists and is not a folder")
    if to.is_dir() and any(to.iterdir()):
        if not force:
            raise UserError(f"--to {to}: the folder is not empty; choose another, or pass --force to replace an "
                            "earlier export")
        config = _read_json(to / "config.json")
        if to.is_symlink() or config is None or "sslbench" not in config:
            raise UserError(f"--to {to}: holds files that are not an sslbench export (no config.json written by "
                            "sslbench export); --force replaces only an earlier export, so move it away yourself")


def export_model(source: str, to: str, *, weights: str | None = None, recipe: str | None = None,
                 fmt: str | None = None, trust_checkpoint: bool = False, force: bool = False,
                 license: str = "other", push_to_hub: str | None = None, private: bool = False,
                 api: Any = None) -> Path:
    """Export ``source`` (a run folder or a checkpoint file) to the folder ``to``; see the module docstring.
    ``api`` replaces ``huggingface_hub.HfApi()`` for the push. Returns the folder."""
    from sslbench.core.io import atomic_directory
    from sslbench.core.registry import get_registry
    from sslbench.results.model_card import CardFacts, headlines, model_card
    from sslbench.core.timm_export import check_expressible, model_args, timm_config, write_timm_folder
    from sslbench.results.metrics import versions

    if weights is not None and weights not in WEIGHTS:
        raise UserError(f"--weights: got {weights!r}, expected one of {', '.join(WEIGHTS)}")
    if private and not push_to_hub:
        raise UserError("--private: only with --push-to-hub")
    destination = Path(to)
    _check_destination(destination, force)
    registry = get_registry()
    src = _Source(source, weights=weights, recipe_path=recipe, fmt=fmt, registry=registry)
    if destination.resolve() in (src.path.resolve().parent, *src.path.resolve().parents):
        raise UserError(f"--to {destination}: would replace the folder holding the checkpoint")

    backbone = src.build(registry)
    architecture = backbone.model_name
    args = model_args(backbone.vit, architecture)
    check_expressible(backbone.vit, architecture, args)          # before reading the weights
    src.load(backbone, registry, trust_checkpoint)
    backbone.eval()

    mean, std, eval_size = _normalisation(src.recipe, backbone.in_chans)
    notes = []
    if src.recipe is None:
        notes.append(f"No recipe was available, so the normalisation is sslbench's default for "
                     f"{backbone.in_chans} channel(s); check it against the data the model was trained on.")
    if eval_size and eval_size != backbone.img_size:
        notes.append(f"sslbench evaluated this backbone on {eval_size}-px images (its position table resized); "
                     f"timm builds it for {backbone.img_size} px — pass img_size={eval_size} to "
                     "timm.create_model to match.")
    stages = (src.recipe or {}).get("stages") or []
    last_stage = stages[-1].get("name") if stages and src.run_dir is not None else None
    results, results_note = headlines(src.run_dir, src.weights, last_stage) if src.run_dir is not None else (
        [], "Exported from a checkpoint file outside a run folder: no metrics.csv to report.")
    chain = "+".join(dict.fromkeys(str(s.get("objective")) for s in stages)) if stages else None
    provenance = {"version": versions()["sslbench_version"], "weights": src.weights, "source": str(src.path),
                  "format": src.fmt, "run": src.run_dir.name if src.run_dir else None, "objective": chain,
                  "recipe_hash": src.recipe_hash}
    description = (f"{chain or 'pre-trained'} {architecture} exported by sslbench ({src.weights} weights)")
    config = timm_config(architecture, args, in_chans=backbone.in_chans, img_size=backbone.img_size, mean=mean,
                         std=std, license=license, description=description, provenance=provenance,
                         num_features=backbone.embed_dim)
    facts = CardFacts(name=src.name, architecture=architecture, model_args=args,
                      input_size=config["pretrained_cfg"]["input_size"], mean=mean, std=std, weights=src.weights,
                      source=str(src.path), source_format=src.fmt, license=license, versions=versions(),
                      recipe=src.recipe, recipe_hash=src.recipe_hash,
                      trained_with=(src.run_meta or {}).get("sslbench_version"), repo_id=push_to_hub,
                      results=results, results_note=results_note, notes=notes)

    with atomic_directory(destination) as tmp:
        write_timm_folder(tmp, backbone.vit, config)
        (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
    print(f"exported {src.path} ({src.weights} weights) to {destination}/: timm.create_model("
          f"'local-dir:{destination}', pretrained=True)")
    if push_to_hub:
        from sslbench.commands.hub import push_folder

        try:
            url = push_folder(destination, push_to_hub, private=private, api=api)
        except UserError as exc:
            raise UserError(f"{exc} — the export itself is in {destination}/") from None
        print(f"pushed to {url}: timm.create_model('hf-hub:{push_to_hub}', pretrained=True)")
    return destination
