"""Start-up time of each command against ``python -c "import torch"``, interleaved, in one run.

A command that builds no model should not pay for what it does not use: ``--help`` and ``--version`` import no
torch at all, ``list`` imports torch (the plugins' modules are torch modules) but not timm, torchvision or
torch._dynamo, and ``check`` what building a model on the meta device needs (torch and timm). Each command runs as
a fresh process ``--rounds`` times, the commands interleaved so that a change in the machine's load hits all of
them alike; the table gives medians and the ratio to importing torch.

    python benchmarks/bench_startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "sslbench --help": [sys.executable, "-m", "sslbench", "--help"],
    "sslbench --version": [sys.executable, "-m", "sslbench", "--version"],
    "sslbench list": [sys.executable, "-m", "sslbench", "list"],
    "sslbench check recipes/quickstart.toml": [sys.executable, "-m", "sslbench", "check", "recipes/quickstart.toml"],
    'python -c "import torch, timm"': [sys.executable, "-c", "import torch, timm"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            began = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - began)
    torch_time = statistics.median(times['python -c "import torch"'])
    print(f"| command | median of {args.rounds} (s) | ÷ import torch |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.2f} | {median / torch_time:.2f} |")


if __name__ == "__main__":
    main()
