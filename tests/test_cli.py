"""The command line's own promises: `--version` and `--help` answer without importing torch, and `list` without
importing timm, torchvision or torch._dynamo (seconds of start-up a command that builds no model does not need)."""

from __future__ import annotations

import ast
import subprocess
import sys

# Runs the CLI in a fresh interpreter and prints the heavy modules it imported.
PROBE = ("import sys\nfrom sslbench.cli import main\n"
         "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
         "assert code in (0, None), code\n"
         "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'torchvision', 'torch._dynamo', 'accelerate', "
         "'datasets') if m in sys.modules))\n")


def _run(*argv: str) -> tuple[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    out, _, imported = done.stdout.rpartition("IMPORTED ")
    return out, ast.literal_eval(imported)  # a list literal printed by PROBE


def test_version_and_help_answer_without_importing_torch():
    version, imported = _run("--version")
    assert version.startswith("sslbench 0.1.0 (python ") and "torch " in version and imported == []
    out, imported = _run("--help")
    assert imported == []
    assert "examples:" in out and "sslbench run recipes/quickstart.toml run.name=short" in out
    for variable in ("SSLBENCH_CACHE", "SSLBENCH_FASHION_MNIST", "SSLBENCH_PROGRESS", "HF_TOKEN", "HF_HUB_OFFLINE"):
        assert variable in out


def test_list_imports_torch_but_not_timm():
    out, imported = _run("list")
    assert "mae" in out and "knn" in out
    assert imported == ["torch"]
