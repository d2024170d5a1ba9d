"""The ``sslbench`` command line.

    sslbench list                          what plugins registered (and which failed to load)
    sslbench check RECIPE [KEY=VALUE ...]  validate, print the resolved recipe, parameter counts and the plan
    sslbench run RECIPE [KEY=VALUE ...]    train and evaluate; results in runs/<name>/ (run.output_dir)
    sslbench run RECIPE --dry-run          build everything, one optimiser step per stage on 2 synthetic images
    sslbench eval RECIPE --checkpoint PATH evaluate an existing checkpoint with the recipe's [[eval]], no training
    sslbench leaderboard [DIR] [--plots]   the leaderboard of every run in DIR (default runs/), written into DIR
    sslbench report [DIR]                  the leaderboard as one self-contained HTML page, DIR/report.html
    sslbench publish RUN_DIR... [--to DIR] copy finished runs without their checkpoints into results/
    sslbench export RUN_OR_CKPT --to DIR   a folder plain timm loads (local-dir:DIR); --push-to-hub REPO uploads it

``KEY=VALUE`` overrides change one recipe value on the command line (``stages[1].epochs=5``); see
:mod:`sslbench.training.overrides`. Errors caused by input (a bad recipe key, a missing file) print one line and
exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from sslbench.core.errors import UserError

EXAMPLES = """\
examples:
  sslbench run recipes/quickstart.toml                      a tiny MAE on bundled digits, ~3 min on 2 CPU cores
  sslbench run recipes/quickstart.toml run.name=short stages[0].epochs=10
                                                            the same with two values changed (KEY=VALUE overrides)
  sslbench check recipes/mimrefiner_vitl.toml --allow-missing-files
                                                            validate a paper recipe without its checkpoint file
  sslbench run recipes/fmnist/mae.toml --dry-run            one step per stage on synthetic images, nothing written
  sslbench eval recipes/fmnist/eval_suite.toml --checkpoint runs/fmnist_mae/checkpoints/backbone.pt
  sslbench leaderboard runs --plots && sslbench report runs
  sslbench export runs/quickstart --to exported/quickstart  a folder plain timm loads: local-dir:exported/quickstart
  sslbench list --options                                   every objective, evaluator, dataset and their options

overrides: KEY is a dotted path with list indices (run.seed, stages[1].epochs, stages[0].options.mask_ratio,
eval[0].k, stages[-1] for the last stage); VALUE is a TOML literal (5, 0.6, true, [10, 20], "text") or else a
plain string. They are validated like the file and recorded in the run's recipe.toml/recipe.json and hash.

environment:
  SSLBENCH_CACHE            root of the decoded-dataset and feature caches (default ~/.cache/sslbench)
  SSLBENCH_FASHION_MNIST    folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)
  SSLBENCH_MEMORY_LIMIT_GB  a dataset larger than this decoded is decoded per batch instead (default 4)
  SSLBENCH_DATA_WORKERS     DataLoader workers for such lazy datasets (default min(8, cores - 1))
  SSLBENCH_PROGRESS=0       no progress bars (as --no-progress)
  SSLBENCH_PLUGINS          comma-separated entry-point names to load (default: all installed plugins)
  ACCELERATE_USE_CPU=1      run on the CPU even with a GPU (two CPU processes: torchrun --nproc_per_node 2)
  HF_TOKEN, HF_HOME, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1
                            Hugging Face Hub login, cache and offline mode for `source = "hf"` datasets

Input errors print one line naming the recipe file and key and exit with code 2; --debug adds the traceback.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout."""


def _version() -> str:
    """sslbench's version and those of the libraries that decide results, read without importing them (fast)."""
    from importlib import metadata

    from sslbench.core.version import __version__

    parts = []
    for name in ("torch", "timm", "accelerate", "datasets"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"sslbench {__version__} (python {sys.version.split()[0]}; {', '.join(parts)})"


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="change recipe values, e.g. run.seed=1 stages[1].epochs=5 "
                             "stages[0].options.mask_ratio=0.6 (validated like the file, recorded in the run)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslbench", description="Benchmark self-supervised vision pre-training: "
                                     "train objectives on one backbone and data, evaluate them by one protocol.",
                                     epilog=EXAMPLES, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="objectives, evaluators, checkpoint formats and datasets, with their plugins")
    p.add_argument("--options", action="store_true", help="also list each entry's options")

    p = sub.add_parser("check", help="validate a recipe and print the resolved recipe and the plan, without training")
    p.add_argument("recipe")
    _add_overrides(p)
    p.add_argument("--allow-missing-files", action="store_true",
                   help="report a missing checkpoint file instead of failing (for recipes meant for another machine)")

    p = sub.add_parser("run", help="train and evaluate a recipe")
    p.add_argument("recipe")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--force", action="store_true", help="delete an existing run folder of the same name first")
    p.add_argument("--allow-optimizer-change", action="store_true",
                   help="with --resume: accept a recipe that changes only optimiser settings (stages[i].optimizer, "
                        "schedule, clip_grad), e.g. a lower lr after a divergence; recorded in recipe.json")
    p.add_argument("--seed", type=int, help="override run.seed (the run is named <name>-seed<N>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="build the full-size model, heads and optimiser and take one step per stage on 2 synthetic "
                        "images on the CPU; print parameter counts, time and peak memory; write nothing")

    p = sub.add_parser("eval", help="evaluate an existing checkpoint with a recipe's [[eval]] section, no training")
    p.add_argument("recipe")
    _add_overrides(p)
    p.add_argument("--checkpoint", required=True, help="weights file (.pth/.pt/.safetensors)")
    p.add_argument("--format", help="checkpoint format: timm, mae, data2vec2, sslbench, sslbench_ema or a plugin's "
                                    "(default: sslbench for a run's backbone.pt, else the recipe's)")
    p.add_argument("--name", help="output folder under run.output_dir (default: eval-<checkpoint>)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow the checkpoint to unpickle Python objects besides tensors (runs code from the file: "
                        "only for a file from a trusted source); the recipe's checkpoint_trusted never applies here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    for command, what in (("leaderboard", "the leaderboard (Markdown and CSV) of every run in DIR, written into DIR"),
                          ("report", "the leaderboard as one self-contained HTML page, DIR/report.html (also "
                                     "rewrites the leaderboard files and figures it is made from)")):
        p = sub.add_parser(command, help=what)
        p.add_argument("dir", nargs="?", default="runs", help="folder holding the run folders (default: runs)")
        p.add_argument("--baseline", help="the row (name as in the leaderboard, or run folder) every row of its "
                                          "protocol is tested against (default: the most common base checkpoint)")
        if command == "leaderboard":
            p.add_argument("--plots", action="store_true",
                           help="also write per protocol the headline dot chart and the overlaid per-block curves "
                                "to DIR/plots/")

    p = sub.add_parser("publish", help="copy finished runs, without checkpoints, into the committed results folder")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--to", default="results", help="destination folder (default: results)")
    p.add_argument("--force", action="store_true", help="replace a published run of the same name")

    from sslbench.commands.export import add_arguments as add_export_arguments
    add_export_arguments(sub.add_parser("export", help="a run's backbone as a folder plain timm loads, or on the Hub"))
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``KEY=VALUE`` overrides may also follow the options (``run R --force a=1``), which
    argparse alone would refuse once the positionals were matched."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "list":
            from sslbench.commands.list import print_listing

            return print_listing(options=args.options)
        if args.command == "check":
            from sslbench.commands.check import check_recipe

            return check_recipe(args.recipe, allow_missing=args.allow_missing_files, overrides=args.overrides)
        if args.command == "run":
            from sslbench.training.run import run_recipe

            if args.no_progress or args.dry_run:
                os.environ["SSLBENCH_PROGRESS"] = "0"
            if args.dry_run:
                from sslbench.commands.dry_run import dry_run_recipe

                return dry_run_recipe(args.recipe, seed=args.seed, overrides=args.overrides)
            if args.allow_optimizer_change and not args.resume:
                raise UserError("--allow-optimizer-change: only with --resume")
            run_recipe(args.recipe, resume=args.resume, force=args.force, seed=args.seed,
                       allow_optimizer_change=args.allow_optimizer_change, overrides=args.overrides)
            return 0
        if args.command == "eval":
            from sslbench.commands.eval import evaluate_checkpoint

            if args.no_progress:
                os.environ["SSLBENCH_PROGRESS"] = "0"
            evaluate_checkpoint(args.recipe, args.checkpoint, fmt=args.format, name=args.name,
                                progress=not args.no_progress, trust_checkpoint=args.trust_checkpoint,
                                overrides=args.overrides)
            return 0
        if args.command in ("leaderboard", "report"):
            from sslbench.commands.leaderboard import leaderboard_command

            return leaderboard_command(args.dir, baseline=args.baseline, plots=getattr(args, "plots", False),
                                       report=args.command == "report")
        if args.command == "publish":
            from sslbench.commands.publish import publish_runs

            publish_runs(args.run_dirs, args.to, force=args.force)
            return 0
        if args.command == "export":
            from sslbench.commands.export import export_command

            return export_command(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        # One line, always: a message quoting a file's bytes or a library's text may carry line breaks.
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:   # `sslbench check R | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
