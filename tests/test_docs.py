"""The documentation: the site builds without a warning, and what the pages show exists.

- ``mkdocs build --strict`` succeeds (a broken link or anchor, a page outside the nav, is a warning and so fails)
  and every page in the nav is rendered;
- every path a page names under ``recipes/``, ``examples/`` or ``benchmarks/`` (in inline code or a code block)
  exists in the repository;
- every ``sslbench <command>`` a page shows is a subcommand of the real parser (``sslbench.cli._parser()``, read
  at test time, so new subcommands need no change here);
- the Accelerate configs in ``examples/accelerate/`` load with Accelerate's own loader, and their FSDP / DeepSpeed
  keys are options ``accelerate launch`` knows;
- the SLURM script parses (``bash -n``) and, run with stand-ins for ``scontrol``, ``srun`` and ``accelerate``,
  launches one ``accelerate launch`` per node with the right ranks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The pages whose commands and paths must work on a fresh clone: the site's pages and the top-level README.
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
CHECKED_FOLDERS = ("recipes", "examples", "benchmarks")


def _code(text: str) -> list[str]:
    """The code of a Markdown page: fenced blocks and inline code spans."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return blocks + spans


# ------------------------------------------------------------------------------------------------ the site


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def test_site_builds_strict_and_renders_every_nav_page(tmp_path):
    pytest.importorskip("mkdocs")
    yaml = pytest.importorskip("yaml")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    assert "index.md" in pages and len(pages) >= 10
    for page in pages:
        assert (DOCS / page).is_file(), page
        html = site / ("index.html" if page == "index.md" else page[: -len(".md")] + "/index.html")
        assert html.is_file(), f"{page} was not rendered"
        assert "<h1" in html.read_text(encoding="utf-8"), f"{page} rendered without a title"
    assert not (site / "README" / "index.html").exists(), "docs/README.md is GitHub's pointer, not a site page"


# ---------------------------------------------------------------------------------------- named files exist

_PATH = re.compile(r"(?<![\w./$-])(?:%s)/[\w./<>*{}$-]*" % "|".join(CHECKED_FOLDERS))


def named_paths(text: str) -> set[str]:
    """Repository paths under the checked folders named in a page's code (placeholders and globs left out)."""
    found = set()
    for code in _code(text):
        for match in _PATH.findall(code):
            path = match.rstrip(".,:;")
            if any(c in path for c in "<>*{}$") or path.endswith("..."):
                continue  # a pattern (recipes/<recipe>.toml, recipes/digits/*.toml), not a file
            found.add(path)
    return found


def test_named_paths_finder():
    text = ("Run `sslbench run recipes/quickstart.toml`, see `recipes/digits/*.toml` and `recipes/<name>.toml`.\n"
            "```bash\nsbatch examples/slurm/train_multinode.sbatch   # or benchmarks/step_bench.py,\n```\n"
            "`/data/recipes/x.toml` is elsewhere.")
    assert named_paths(text) == {"recipes/quickstart.toml", "examples/slurm/train_multinode.sbatch",
                                 "benchmarks/step_bench.py"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_file_exists(page):
    missing = sorted(p for p in named_paths(page.read_text(encoding="utf-8")) if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def test_the_new_pages_name_the_examples():
    named = set().union(*(named_paths(p.read_text(encoding="utf-8")) for p in PAGES))
    for example in sorted((ROOT / "examples").rglob("*")):
        if example.is_file():
            assert example.relative_to(ROOT).as_posix() in named, f"{example} is not documented"


# --------------------------------------------------------------------------------- sslbench commands are real


def subcommands() -> set[str]:
    from sslbench.cli import _parser

    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("sslbench's parser has no subcommands")


_SEGMENT_SPLIT = re.compile(r"&&|\|\||;|\bdo\b|\bthen\b|\(|\)")


def shown_commands(text: str) -> list[str]:
    """The subcommand of every ``sslbench`` invocation in a page's code: ``sslbench [--opts] CMD``, also after
    ``-m`` (``python -m sslbench run``, ``accelerate launch ... -m sslbench run``) and a ``$`` prompt.
    ``run|check|eval`` (a synopsis) gives each of them."""
    commands = []
    for code in _code(text):
        for line in code.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)            # shell comments
            for segment in _SEGMENT_SPLIT.split(line):
                tokens = segment.split()
                for i, token in enumerate(tokens):
                    if token != "sslbench":
                        continue
                    before = tokens[i - 1] if i else ""
                    if i and before not in ("-m", "$", "|") and not re.fullmatch(r"[A-Z_]+=\S*", before):
                        continue                             # prose: "... what sslbench does"
                    rest = [t for t in tokens[i + 1:] if not t.startswith("-")]
                    if rest and re.fullmatch(r"[a-z][a-z_-]*(\|[a-z][a-z_-]*)*", rest[0]):
                        commands += rest[0].split("|")
    return commands


def test_shown_commands_finder():
    text = ("`sslbench run|check|eval RECIPE [KEY=VALUE ...]` and `sslbench --debug list`\n```bash\n"
            "$ sslbench check bad.toml\nfor s in 0 1; do sslbench run r.toml --seed $s; done\n"
            "accelerate launch --multi_gpu -m sslbench eval r.toml   # sslbench publish in a comment\n"
            "python -m sslbench leaderboard runs && sslbench report runs\nimport sslbench\n```\n"
            "`sslbench` alone, `sslbench.Objective`")
    assert sorted(shown_commands(text)) == sorted(["run", "check", "eval", "list", "check", "run", "eval",
                                                  "leaderboard", "report"])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shown_sslbench_command_exists(page):
    known = subcommands()
    unknown = sorted({c for c in shown_commands(page.read_text(encoding="utf-8")) if c not in known})
    assert not unknown, f"{page.relative_to(ROOT)} shows sslbench commands that do not exist: {unknown} " \
                        f"(known: {sorted(known)})"


# ----------------------------------------------------------------------------------- Accelerate configs load

ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))


def test_there_are_accelerate_configs():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"multi_node.yaml", "fsdp_vith.yaml"} <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))                 # unknown top-level keys and bad enums raise
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= config.num_machines >= 1
    # Nested FSDP / DeepSpeed keys are copied onto the launch arguments by name, silently: check them here.
    options = {action.dest for action in launch_command_parser()._actions}
    for key in (config.fsdp_config or {}):
        name = key if key.startswith("fsdp_") else f"fsdp_{key}"
        assert name in options, f"{path.name}: fsdp_config.{key} is not an accelerate launch option"
    for key in (config.deepspeed_config or {}):
        assert key in options, f"{path.name}: deepspeed_config.{key} is not an accelerate launch option"


# ------------------------------------------------------------------------------------------- SLURM script

SBATCH = ROOT / "examples" / "slurm" / "train_multinode.sbatch"


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    _stand_in(bin_dir, "scontrol", 'if [ "$1 $2" = "show hostnames" ]; then printf "node-a\\nnode-b\\n"; fi\n')
    # srun: drop its own options, run the command once per node as SLURM would, with that node's SLURM_NODEID
    _stand_in(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                               'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    _stand_in(bin_dir, "accelerate", f'echo "$*" >> {calls}\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("RECIPE", None)
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    launches = calls.read_text().splitlines()
    assert len(launches) == 2, launches
    for rank, launch in enumerate(launches):
        assert launch.startswith("launch --config_file examples/accelerate/multi_node.yaml "), launch
        assert f"--machine_rank {rank} " in launch, launch
        for expected in ("--num_machines 2 ", "--num_processes 16 ", "--main_process_ip node-a ",
                         "--main_process_port 29500 ", "-m sslbench run recipes/mimrefiner_vitl.toml --resume"):
            assert expected in launch, (expected, launch)
    config_file = launches[0].split()[2]
    assert (ROOT / config_file).is_file()
