"""How quickly the listing commands and ``doctor`` answer, and what importing their modules the old way cost.

Each command runs in a fresh Python process (as a user's shell starts one), ``--repeats`` times; the table gives
the median wall time and the peak resident memory of the child. The "before" rows import what ``models`` and
``datasets`` imported until they read their registries torch-free (transferlab.models, the data loaders), and what
``doctor`` imported until it read the machine torch-free (torch, torchvision, torchattacks, transferlab.prefix).
Aim (issue 24): ``--help``, ``models``, ``datasets``, ``doctor`` in <= 1.5 s and <= 200 MB on a 2-vCPU machine.

    python bench/listing.py
    python bench/listing.py --repeats 5 --no-record
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import ROOT, finish, table

COMMANDS = {
    "transferlab --help": "from transferlab.cli import main; main(['--help'])",
    "transferlab models": "from transferlab.cli import main; main(['models'])",
    "transferlab datasets": "from transferlab.cli import main; main(['datasets'])",
    "transferlab pretrain --help": "from transferlab.cli import main; main(['pretrain', '--help'])",
    "transferlab doctor --no-calibration": "from transferlab.cli import main; main(['doctor', '--no-calibration'])",
    "transferlab doctor": "from transferlab.cli import main; main(['doctor'])",
    "before: import transferlab.models": "import transferlab.models",
    "before: import the data loaders": "import transferlab.data.loaders",
    "before: import what doctor imported": "import torch, torchvision, torchattacks, transferlab.prefix",
}


def _run_once(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process running ``code`` (os.wait4: its own peak, Linux)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, env=env) as child:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{code!r} exited with {child.returncode}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="Print only; do not append to RESULTS.md.")
    args = parser.parse_args()
    rows = []
    for name, code in COMMANDS.items():
        runs = [_run_once(code) for _ in range(args.repeats)]
        rows.append([name, f"{statistics.median(s for s, _ in runs):.2f}", f"{max(m for _, m in runs):.0f}"])
    printed = table(["command", "median wall s", "peak RSS MB"], rows)
    finish("bench/listing.py", printed, not args.no_record)


if __name__ == "__main__":
    main()
